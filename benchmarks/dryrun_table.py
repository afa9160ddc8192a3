"""Per-device memory of the 1.5B and 8B train steps on simulated meshes (launch.dryrun).

  python -m benchmarks.dryrun_table [--configs=ft_1p5b,ft_8b] [--devices=8,64,256]
      [--remat=full] [--hbm_gb=80]
  python -m benchmarks.dryrun_table --points=ft_8b:8,ft_1p5b:1   # one node: what fits

Each point runs `launch.dryrun` in its own process (the fake device count is fixed when jax
starts) with the config's mesh (fsdp over all devices by default) and the paper's sequence length
and global batch (4M tokens). A point that does not fit gets the dry run's search: the smallest
train.grad_accum_steps (then remat_policy=full) that fits, in the "fits with" columns.
"""

import itertools
import json
import subprocess
import sys

from absl import app, flags

from benchmarks import common

_CONFIGS = flags.DEFINE_list("configs", ["ft_1p5b", "ft_8b"], "Experiment configs.")
_DEVICES = flags.DEFINE_list("devices", ["8", "64", "256"], "Simulated device counts.")
_REMAT = flags.DEFINE_list("remat", ["full"], "Remat policies.")
_HBM_GB = flags.DEFINE_float("hbm_gb", 80.0, "Memory per device.")
_PARAM_DTYPES = flags.DEFINE_list("param_dtypes", ["float32"], "model.param_dtype values.")
_POINTS = flags.DEFINE_list("points", [], "config:devices pairs (instead of --configs x --devices).")


def run_point(config, devices, remat, param_dtype):
  cmd = [sys.executable, "-m", "launch.dryrun", f"--config=experiments/{config}.py",
         f"--num_devices={devices}", f"--hbm_gb={_HBM_GB.value}", "--json",
         f"--config.model.remat_policy={remat}", f"--config.model.param_dtype={param_dtype}"]
  result = subprocess.run(cmd, capture_output=True, text=True)
  lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
  if not lines:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
  return json.loads(lines[-1])


def main(argv):
  del argv
  points = ([tuple(p.split(":")) for p in _POINTS.value] if _POINTS.value else
            [(c, d) for c in _CONFIGS.value for d in _DEVICES.value])
  rows = []
  for config, devices in points:
    for remat, param_dtype in itertools.product(_REMAT.value, _PARAM_DTYPES.value):
      r = run_point(config, devices, remat, param_dtype)
      gb = r["per_device_gb"]
      found = r.get("fits_with")
      rows.append([config, f"{r['config_params'] / 1e9:.2f}B", devices,
                   ",".join(f"{k}={v}" for k, v in r["mesh"].items()), remat, param_dtype,
                   f"{gb['arguments']:.2f}", f"{gb['temporaries']:.2f}", f"{gb['total']:.2f}",
                   "yes" if r["fits"] else "no",
                   ", ".join(f"{k.split('.')[-1]}={v}" for k, v in found["overrides"].items())
                   if found else "", f"{found['per_device_gb']['total']:.2f}" if found else "",
                   f"{r['flops_per_step_per_device'] / 1e12:.0f}"])
      print(rows[-1], flush=True)
  table = common.markdown_table(
      ["config", "params", "devices", "mesh", "remat", "param dtype", "args GB/dev", "temps GB/dev",
       "total GB/dev", f"fits {_HBM_GB.value:g} GB", "fits with", "its total GB/dev",
       "TFLOP/step/dev"], rows)
  common.record("Dry run: per-device memory of the train step (seq 4096, 4M-token batch)", table,
                "Compiled ahead of time by XLA:CPU on fake devices; buffer sizes from "
                "`compiled.memory_analysis()` (GPU/TPU compilers assign buffers differently, so "
                "treat these as estimates). Outputs alias the donated arguments.")


if __name__ == "__main__":
  app.run(main)
