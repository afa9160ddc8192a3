"""Run a sweep declared by an experiment file: one ordinary training run per point.

  python -m launch.sweep --config=experiments/synthetic_sweep.py --workdir=runs/sweep [--print_only]
      [--only=REGEX]

The file defines `get_config()` (the base config) and `get_sweep()`, a list of override dicts
({"model.latent.kappa_bits": 0.25, ...}). Each point trains in `workdir/<name>` with
`python -m launch.train` (sequentially), finished points are skipped, unfinished ones resume
from their checkpoints, and `workdir/summary.csv` and `summary.md` get the final metrics of every
point. With --print_only the launch commands are printed (one per line) for a cluster scheduler.
"""

import csv
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

from absl import app, flags

from launch import cli

_CONFIG = flags.DEFINE_string("config", None, "Sweep file (get_config() and get_sweep()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory of the sweep.")
_PRINT_ONLY = flags.DEFINE_bool("print_only", False, "Print the launch commands and exit.")
_ONLY = flags.DEFINE_string("only", None, "Regular expression: run only the points whose name "
                            "matches (e.g. 'num_bits=16|base').")

SUMMARY_KEYS = ("step", "loss", "ce", "kl", "eval_ce", "eval_elbo", "eval_kl", "eval_bpb")


def load_sweep(path):
  """The list of override dicts declared by the sweep file at `path`."""
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except (OSError, SyntaxError, ImportError) as e:
    cli.fail(f"config error: cannot load the sweep file {path}: {e}")
  if not hasattr(module, "get_sweep"):
    cli.fail(f"config error: {path} defines no get_sweep()")
  return module.get_sweep()


def point_name(overrides):
  """A directory name from the overrides: 'num_bits=8,kappa_bits=0.25' (last key parts)."""
  if not overrides:
    return "base"
  return ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())


def train_command(config, workdir, overrides):
  return [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in overrides.items())]


def final_metrics(workdir):
  """The last value of each summary metric in the run's metrics.jsonl ({} if none)."""
  out = {}
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      for line in f:
        out.update({k: v for k, v in json.loads(line).items() if k in SUMMARY_KEYS})
  except (OSError, json.JSONDecodeError):
    pass
  return out


def is_finished(workdir):
  """A point is finished when its checkpoints hold the config's last step."""
  try:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      steps = json.load(f)["train"]["steps"]
  except (OSError, json.JSONDecodeError, KeyError):
    return False
  return os.path.isdir(os.path.join(workdir, "checkpoints", str(steps)))


def write_summary(root, rows):
  keys = ["point"] + [k for k in SUMMARY_KEYS if any(k in r for r in rows)]
  with open(os.path.join(root, "summary.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, keys)
    writer.writeheader()
    writer.writerows(rows)
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
  with open(os.path.join(root, "summary.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return "\n".join(lines)


def main(argv):
  cli.no_extra_args(argv)
  if not _CONFIG.value or not _WORKDIR.value:
    cli.fail("flag error: --config and --workdir are required")
  points = load_sweep(_CONFIG.value)
  names = [point_name(p) for p in points]
  if len(set(names)) != len(names):
    cli.fail("config error: get_sweep() declares the same point twice")
  try:
    selected = [(n, p) for n, p in zip(names, points) if re.search(_ONLY.value or "", n)]
  except re.error as e:
    cli.fail(f"flag error: --only is not a regular expression: {e}")
  if not selected:
    cli.fail(f"flag error: --only={_ONLY.value} matches none of: {', '.join(names)}")
  commands = [train_command(_CONFIG.value, os.path.join(_WORKDIR.value, n), p)
              for n, p in selected]
  if _PRINT_ONLY.value:
    for cmd in commands:
      print(shlex.join(cmd))
    return
  os.makedirs(_WORKDIR.value, exist_ok=True)
  failed = []
  for (name, _), cmd in zip(selected, commands):
    workdir = os.path.join(_WORKDIR.value, name)
    if is_finished(workdir):
      print(f"[{name}] finished, skipped", flush=True)
      continue
    print(f"[{name}] {'resuming' if os.path.isdir(workdir) else 'starting'}: {shlex.join(cmd)}",
          flush=True)
    if subprocess.run(cmd).returncode != 0:
      failed.append(name)
  # The summary covers every point of the sweep that has a run directory, selected or not.
  rows = [{"point": n, **final_metrics(os.path.join(_WORKDIR.value, n))} for n in names
          if os.path.isdir(os.path.join(_WORKDIR.value, n))]
  print(write_summary(_WORKDIR.value, rows))
  if failed:
    cli.fail(f"sweep: {len(failed)} point(s) failed: {', '.join(failed)}", status=1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
