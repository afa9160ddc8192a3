"""Train-step time of the baseline and the Free Transformer at a few sizes, with MFU.

  python -m benchmarks.step_time [--repeats=10] [--sizes=small,medium]

MFU is measured against the best matmul FLOP/s of this device in the same run; the FT/baseline
time ratio is printed beside the analytic FLOP ratio (ftjax.metrics.flops_per_token).
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import common
from ftjax import metrics, train
from ftjax.configs import default_config, resolve

SIZES = {  # name: (num_layers, d_model, heads, kv heads, mlp, batch, seq_len)
    "small": (4, 256, 4, 2, 768, 8, 256),
    "medium": (8, 512, 8, 4, 1536, 8, 256),
    "large": (8, 768, 12, 4, 2048, 8, 256),
}
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per point (after one warm-up).")
_SIZES = flags.DEFINE_list("sizes", ["small", "medium", "large"], f"Among {list(SIZES)}.")
_BITS = flags.DEFINE_integer("num_bits", 16, "H for the Free Transformer.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")


def make_config(size, latent, num_bits, dtype):
  layers, d, heads, kv, mlp, batch, seq = SIZES[size]
  c = default_config()
  c.data.name = "shakespeare"  # only for validation: the benchmark feeds random tokens
  c.model.update(num_layers=layers, d_model=d, num_heads=heads, num_kv_heads=kv, mlp_dim=mlp,
                 vocab_size=264, seq_len=seq, dtype=dtype)
  c.model.latent.update(enabled=latent, num_bits=num_bits, kappa_bits=0.5)
  c.train.batch_size = batch
  return resolve(c)


def time_step(cfg, repeats):
  """(median, min, max) seconds of one jitted, donated train step on random tokens."""
  trainer = train.Trainer.create(cfg)
  state = trainer.init_state()
  tokens = jax.random.randint(jax.random.key(1), (cfg.train.batch_size, cfg.model.seq_len + 1),
                              3, cfg.model.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  state, m = trainer.train_step(state, batch)
  jax.block_until_ready(m)

  def run():
    nonlocal state
    state, m = trainer.train_step(state, batch)
    jax.block_until_ready(m)

  return common.time_calls(run, repeats)


def main(argv):
  del argv
  dtype = _DTYPE.value
  peak = metrics.measure_matmul_peak(jnp.dtype(dtype), repeats=5)
  rows = []
  for size in _SIZES.value:
    result = {}
    for latent in (False, True):
      cfg = make_config(size, latent, _BITS.value, dtype)
      med, lo, hi = time_step(cfg, _REPEATS.value)
      tokens = cfg.train.batch_size * cfg.model.seq_len
      fpt = metrics.flops_per_token(cfg.model)
      result[latent] = (med, fpt)
      rows.append([size, "FT" if latent else "baseline", cfg.model.num_layers, cfg.model.d_model,
                   cfg.model.seq_len, f"{cfg.train.batch_size}", f"{med * 1e3:.1f}",
                   f"{lo * 1e3:.1f}–{hi * 1e3:.1f}", f"{tokens / med:,.0f}",
                   f"{100 * fpt * tokens / med / peak:.1f}%",
                   f"{result[True][0] / result[False][0]:.3f}" if latent else "",
                   f"{result[True][1] / result[False][1]:.3f}" if latent else ""])
  table = common.markdown_table(
      ["size", "model", "L", "D", "T", "B", "step ms (median)", "min–max", "tokens/s", "MFU",
       "FT/base time", "FT/base FLOPs"], rows)
  common.record(f"Train step time, baseline vs FT (H={_BITS.value}, {dtype})", table,
                f"Matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s. "
                f"{_REPEATS.value} timed steps per point.")


if __name__ == "__main__":
  app.run(main)
