"""Train-step time of the baseline and the Free Transformer at a few sizes and H, with MFU.

  python -m benchmarks.step_time [--repeats=10] [--sizes=small,medium,large] [--num_bits=8,12,16]

MFU is measured against the best matmul FLOP/s of this device in the same run; the FT/baseline
time ratio is printed beside the analytic FLOP ratio (ftjax.metrics.flops_per_token). The notes
give the same analytic ratio for the ft_1p5b and ft_8b configs.
"""

import jax.numpy as jnp
from absl import app, flags

from benchmarks import common
from experiments import ft_1p5b, ft_8b
from ftjax import metrics
from ftjax.configs import resolve

_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per point (after one warm-up).")
_SIZES = flags.DEFINE_list("sizes", ["small", "medium", "large"], f"Among {list(common.SIZES)}.")
_BITS = flags.DEFINE_list("num_bits", ["8", "12", "16"], "H values for the Free Transformer.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")


def analytic_overhead(get_config):
  """FT/baseline analytic FLOPs per training token of a big config."""
  ft = resolve(get_config())
  base = ft.copy_and_resolve_references()
  base.model.latent.enabled = False
  return metrics.flops_per_token(ft.model) / metrics.flops_per_token(base.model)


def main(argv):
  del argv
  dtype = _DTYPE.value
  peak = metrics.measure_matmul_peak(jnp.dtype(dtype), repeats=5)
  rows = []
  for size in _SIZES.value:
    points = [None] + [int(h) for h in _BITS.value]
    base = None
    for h in points:
      cfg = common.size_config(size, h is not None, h or 16, dtype)
      step = common.train_step_fn(cfg)
      step()  # compile
      med, lo, hi = common.time_calls(step, _REPEATS.value)
      tokens = cfg.train.batch_size * cfg.model.seq_len
      fpt = metrics.flops_per_token(cfg.model)
      base = base or (med, fpt)
      rows.append([size, f"FT H={h}" if h else "baseline", cfg.model.num_layers,
                   cfg.model.d_model, f"{cfg.train.batch_size}×{cfg.model.seq_len}",
                   f"{med * 1e3:.1f}", f"{lo * 1e3:.1f}–{hi * 1e3:.1f}", f"{tokens / med:,.0f}",
                   f"{100 * fpt * tokens / med / peak:.1f}%",
                   f"{med / base[0]:.3f}" if h else "", f"{fpt / base[1]:.3f}" if h else "",
                   f"{(med / base[0]) / (fpt / base[1]):.3f}" if h else ""])
  table = common.markdown_table(
      ["size", "model", "L", "D", "B×T", "step ms (median)", "min–max", "tokens/s", "MFU",
       "FT/base time", "FT/base FLOPs", "time ratio / FLOP ratio"], rows)
  common.record(f"Train step time, baseline vs FT ({dtype})", table,
                f"Matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s. "
                f"{_REPEATS.value} timed steps per point. Analytic FT/baseline FLOPs per "
                f"training token: ft_1p5b {analytic_overhead(ft_1p5b.get_config):.4f}, "
                f"ft_8b {analytic_overhead(ft_8b.get_config):.4f}.")


if __name__ == "__main__":
  app.run(main)
