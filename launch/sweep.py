"""Run a sweep declared by an experiment file: one ordinary training run per point.

  python -m launch.sweep --config=experiments/synthetic_sweep.py --workdir=runs/sweep [--print_only]
      [--only=REGEX] [--in_process] [--set=train.steps=100 ...]

The file defines `get_config()` (the base config) and `get_sweep()`, a list of override dicts
({"model.latent.kappa_bits": 0.25, ...}). Each point trains in `workdir/<name>` with
`python -m launch.train` (sequentially), finished points are skipped, unfinished ones resume
from their checkpoints, and `workdir/summary.csv` and `summary.md` get the final metrics of every
point. With --print_only the launch commands are printed (one per line) for a cluster scheduler.

--in_process trains the points one after another in this Python process: consecutive points whose
configs differ only in κ or the target rate (`model.latent.kappa`, `kappa_bits`, `target_bits`:
traced values of the train state) reuse the compiled steps. A sweep file may define
`after_point(trainer, state, workdir)`, called in this mode after each point (e.g. to sample
from the model), also after one stopped by SIGTERM, before the sweep stops. --set applies `key=value` overrides to every point (not part of the names).
"""

import ast
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
_IN_PROCESS = flags.DEFINE_bool("in_process", False, "Train the points in this process, reusing "
                                "the compiled steps across points that differ only in kappa.")
_SET = flags.DEFINE_multi_string("set", [], "key=value override applied to every point "
                                 "(e.g. train.steps=100).")

SUMMARY_KEYS = ("step", "loss", "ce", "kl", "kl_beta", "kl_ema", "eval_ce", "eval_elbo",
                "eval_kl", "eval_bpb", "eval_z_use", "eval_z_mi", "eval_z_mi_bits_bound",
                "eval_z_active_bits", "eval_z_code_ppl", "eval_z_code_ppl_argmax")
# Config keys that are traced values of the train state: points differing only in them share
# compiled steps (--in_process).
TRACED_KEYS = ("kappa", "kappa_bits", "target_bits")


def load_module(path):
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except (OSError, SyntaxError, ImportError) as e:
    cli.fail(f"config error: cannot load the sweep file {path}: {e}")
  if not hasattr(module, "get_sweep"):
    cli.fail(f"config error: {path} defines no get_sweep()")
  return module


def load_sweep(path):
  """The list of override dicts declared by the sweep file at `path`."""
  return load_module(path).get_sweep()


def parse_set(items):
  """{key: value} from 'key=value' strings (values as Python literals, else strings)."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      cli.fail(f"flag error: --set={item}: expected key=value")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def compile_key(cfg):
  """The resolved config without its traced keys: equal keys share compiled steps."""
  d = cfg.to_dict()
  for k in TRACED_KEYS:
    d["model"]["latent"].pop(k, None)
  return json.dumps(d, sort_keys=True, default=str)


def run_in_process(module, root, selected, extra):
  """Trains the selected points here; returns the names of the points that failed."""
  from absl import logging

  from ftjax import configs, loop
  from ftjax.trainer import Trainer
  logging.set_verbosity(logging.WARNING)
  base = module.get_config()
  after = getattr(module, "after_point", None)
  trainer, key, failed = None, None, []
  for name, overrides in selected:
    workdir = os.path.join(root, name)
    if is_finished(workdir):
      print(f"[{name}] finished, skipped", flush=True)
      continue
    try:
      cfg = configs.resolve(configs.with_overrides(base, {**overrides, **extra}))
    except configs.ConfigError as e:
      print(f"[{name}] config error: {e}", flush=True)
      failed.append(name)
      continue
    if compile_key(cfg) != key:
      trainer, key = Trainer.create(cfg, run_dir=workdir), compile_key(cfg)
      print(f"[{name}] {'resuming' if os.path.isdir(workdir) else 'starting'} (compiling)",
            flush=True)
    else:
      print(f"[{name}] {'resuming' if os.path.isdir(workdir) else 'starting'} (compiled steps "
            "reused)", flush=True)
    state = loop.train_and_evaluate(cfg, workdir, log=lambda line, n=name: print(
        f"[{n}] {line}", flush=True), trainer=trainer)
    stopped = int(state.step) < cfg.train.steps  # by a signal: the checkpoint is saved
    if after is not None:  # also for a stopped point: what it shows at the step it reached
      after(trainer, state, workdir)
    if stopped:
      print(f"[{name}] stopped at step {int(state.step)}", flush=True)
      failed.append(name)
      break
  return failed


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
  from ftjax.metrics import read_rows
  out = {}
  for row in read_rows(workdir):
    out.update({k: v for k, v in row.items() if k in SUMMARY_KEYS})
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
  cli.check_paths(directories=[("workdir", _WORKDIR.value)])
  module = load_module(_CONFIG.value)
  points = module.get_sweep()
  extra = parse_set(_SET.value)
  names = [point_name(p) for p in points]
  if len(set(names)) != len(names):
    cli.fail("config error: get_sweep() declares the same point twice")
  try:
    selected = [(n, p) for n, p in zip(names, points) if re.search(_ONLY.value or "", n)]
  except re.error as e:
    cli.fail(f"flag error: --only is not a regular expression: {e}")
  if not selected:
    cli.fail(f"flag error: --only={_ONLY.value} matches none of: {', '.join(names)}")
  commands = [train_command(_CONFIG.value, os.path.join(_WORKDIR.value, n), {**p, **extra})
              for n, p in selected]
  if _PRINT_ONLY.value:
    for cmd in commands:
      print(shlex.join(cmd))
    return
  os.makedirs(_WORKDIR.value, exist_ok=True)
  failed = []
  if _IN_PROCESS.value:
    failed = run_in_process(module, _WORKDIR.value, selected, extra)
    commands = []
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
