"""Matmul FLOP/s and train-step time on CPU under XLA:CPU library options, against the default.

  python -m benchmarks.xla_cpu_flags [--size=small] [--repeats=5]

Each setting runs in its own process with XLA_FLAGS set before jax starts: the square-matmul
peak (4096², fp32), then the baseline and the FT (H=8) train steps of `size`. With torch
installed, its matmul FLOP/s on the same threads is printed too, for reference.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

from benchmarks import common

_SIZE = flags.DEFINE_string("size", "small", f"Among {list(common.SIZES)}.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per point (after one warm-up).")
_WORKER = flags.DEFINE_bool("worker", False, "Internal: measure under the current XLA_FLAGS.")

SETTINGS = [
    ("default", ""),
    ("XNNPACK dots", "--xla_cpu_experimental_xnn_fusion_type=dot"),
    ("XNNPACK dots + eltwise", "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise"),
    ("YNNPACK dots", "--xla_cpu_experimental_ynn_fusion_type=dot"),
    ("oneDNN dots", "--xla_cpu_experimental_onednn_fusion_type=dot"),
    ("fast math", "--xla_cpu_enable_fast_math=true"),
]


def worker():
  import jax.numpy as jnp

  from ftjax import metrics
  out = {"matmul": metrics.measure_matmul_peak(jnp.float32, repeats=5)}
  for name, latent in (("baseline", False), ("ft", True)):
    step = common.train_step_fn(common.size_config(_SIZE.value, latent, 8))
    step()
    out[name] = common.time_calls(step, _REPEATS.value)
  print("RESULT " + json.dumps(out))


def torch_matmul_peak(size=4096):
  """Best FLOP/s of a square fp32 matmul in torch on all cores (None without torch)."""
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count())
  a = torch.randn(size, size)
  return 2 * size**3 / common.time_calls(lambda: a @ a, 6)[1]


def main(argv):
  del argv
  if _WORKER.value:
    return worker()
  rows, base = [], None
  for name, xla_flags in SETTINGS:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip())
    run = subprocess.run([sys.executable, "-m", "benchmarks.xla_cpu_flags", "--worker",
                          f"--size={_SIZE.value}", f"--repeats={_REPEATS.value}"],
                         env=env, capture_output=True, text=True)
    lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
    if run.returncode or not lines:
      rows.append([name, f"`{xla_flags}`", "failed: " + (run.stderr.strip().splitlines() or
                                                         ["?"])[-1][:80], "", "", ""])
      continue
    r = json.loads(lines[-1][len("RESULT "):])
    base = base or r
    rows.append([name, f"`{xla_flags}`" if xla_flags else "", f"{r['matmul'] / 1e9:.0f}",
                 f"{r['baseline'][0] * 1e3:.0f} ({base['baseline'][0] / r['baseline'][0]:.2f}×)",
                 f"{r['ft'][0] * 1e3:.0f} ({base['ft'][0] / r['ft'][0]:.2f}×)",
                 f"{r['baseline'][1] * 1e3:.0f}–{r['baseline'][2] * 1e3:.0f}"])
  peak = torch_matmul_peak()
  common.record(
      f"XLA:CPU options, {_SIZE.value} size (train step, fp32)",
      common.markdown_table(["setting", "XLA_FLAGS", "matmul GFLOP/s", "baseline step ms "
                             "(speed-up)", "FT H=8 step ms (speed-up)", "baseline min–max"], rows),
      f"{_REPEATS.value} timed steps per point, each setting in its own process."
      + (f" torch matmul on the same cores: {peak / 1e9:.0f} GFLOP/s." if peak else ""))


if __name__ == "__main__":
  app.run(main)
