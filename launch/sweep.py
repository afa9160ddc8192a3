"""Run a sweep declared by an experiment file: one ordinary training run per point.

  python -m launch.sweep --config=experiments/synthetic_sweep.py --workdir=runs/sweep [--print_only]
      [--only=REGEX] [--in_process] [--set=train.steps=100 ...]
      [--launcher=slurm [--sbatch_args='--nodes=4 --time=12:00:00']] [--status]

The file defines `get_config()` (the base config) and `get_sweep()`, a list of override dicts
({"model.latent.kappa_bits": 0.25, ...}). Each point trains in `workdir/<name>` with
`python -m launch.train` (sequentially), finished points are skipped, unfinished ones resume
from their checkpoints, and `workdir/summary.csv` and `summary.md` get the final metrics of every
point. With --print_only the launch commands are printed (one per line) for a cluster scheduler.

--in_process trains the points one after another in this Python process: consecutive points whose
configs differ only in κ or the target rate (`model.latent.kappa`, `kappa_bits`, `target_bits`:
traced values of the train state) reuse the compiled steps. A sweep file may define
`after_point(trainer, state, workdir)` (the signature of a config's train.end_of_run hook),
called in this mode after each point (e.g. to sample from the model), also after one stopped by
SIGTERM, before the sweep stops. --set applies
`key=value` overrides to every point (not part of the names).

--launcher=slurm submits the points that are neither finished nor in SLURM's queue as one job
array of --sbatch_script (task i trains point i of get_sweep() with the script's resources, then
refreshes the summary) and returns; the job id goes to the point's `slurm.json`, the logs to
workdir/slurm_logs/. Called again, it submits the points whose jobs stopped early (failed,
cancelled, preempted, timed out) and skips the rest. --status prints each point's state, step,
last eval metrics and SLURM job, and refreshes the summary files.
"""

import ast
import csv
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys

from absl import flags

from ftjax import storage
from ftjax.errors import SlurmError
from launch import cli
from launch.slurm import jobs

_CONFIG = flags.DEFINE_string("config", None, "Sweep file (get_config() and get_sweep()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory of the sweep.")
_PRINT_ONLY = flags.DEFINE_bool("print_only", False, "Print the launch commands and exit.")
_ONLY = flags.DEFINE_string("only", None, "Regular expression: run only the points whose name "
                            "matches (e.g. 'num_bits=16|base').")
_IN_PROCESS = flags.DEFINE_bool("in_process", False, "Train the points in this process, reusing "
                                "the compiled steps across points that differ only in kappa.")
_SET = flags.DEFINE_multi_string("set", [], "key=value override applied to every point "
                                 "(e.g. train.steps=100).")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "slurm"], "local: train the points "
                              "here, one after another; slurm: submit them as one SLURM job array "
                              "and return.")
_SBATCH_ARGS = flags.DEFINE_string("sbatch_args", "", "sbatch options for --launcher=slurm, e.g. "
                                   "'--nodes=4 --time=12:00:00' (over the script's #SBATCH lines).")
_SBATCH_SCRIPT = flags.DEFINE_string("sbatch_script", jobs.SCRIPT, "Batch script of "
                                     "--launcher=slurm (run as: SCRIPT --sweep <sweep flags>).")
_STATUS = flags.DEFINE_bool("status", False, "Print each point's state, step, last eval metrics "
                            "and SLURM job, refresh summary.csv and summary.md, and exit.")
_ARRAY_TASK = flags.DEFINE_bool("array_task", False, "Run the point of SLURM_ARRAY_TASK_ID (what "
                                "each process of a --launcher=slurm array task runs).")

SUMMARY_KEYS = ("step", "loss", "ce", "kl", "kl_beta", "kl_ema", "eval_ce", "eval_elbo",
                "eval_kl", "eval_bpb", "eval_z_use", "eval_z_mi", "eval_z_mi_bits_bound",
                "eval_z_active_bits", "eval_z_code_ppl", "eval_z_code_ppl_argmax")
# States of a point that nothing runs: --launcher=slurm submits these.
IDLE = ("stopped", "unfinished", "not started")
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
  from ftjax.errors import ConfigError
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
    except ConfigError as e:
      print(f"[{name}] {e}", flush=True)  # "config error: ..."
      failed.append(name)
      continue
    if compile_key(cfg) != key:
      trainer, key = Trainer.create(cfg, run_dir=workdir), compile_key(cfg)
      print(f"[{name}] {'resuming' if storage.isdir(workdir) else 'starting'} (compiling)",
            flush=True)
    else:
      print(f"[{name}] {'resuming' if storage.isdir(workdir) else 'starting'} (compiled steps "
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
  """Whether the point's run holds its last step (`ftjax.run.is_finished`; ftjax loads here, so
  that flag errors stay fast)."""
  from ftjax import run
  return run.is_finished(workdir)


def markdown(rows, keys):
  """`rows` as a markdown table of the columns `keys`."""
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
  return "\n".join(lines)


def write_summary(root, rows):
  keys = ["point"] + [k for k in SUMMARY_KEYS if any(k in r for r in rows)]
  text = io.StringIO()
  writer = csv.DictWriter(text, keys)
  writer.writeheader()
  writer.writerows(rows)
  # Each written whole, at once (array tasks that finish together may write the summary).
  storage.write_bytes(os.path.join(root, "summary.csv"), text.getvalue().encode())
  table = markdown(rows, keys)
  storage.write_bytes(os.path.join(root, "summary.md"), (table + "\n").encode())
  return table


def summarize(root, names):
  """Writes the summary of every point of the sweep that has metrics, selected or not; returns
  its markdown."""
  rows = [{"point": n, **m} for n in names if (m := final_metrics(os.path.join(root, n)))]
  return write_summary(root, rows)


def point_state(workdir, record, queued):
  """'finished', the queue state of the point's SLURM job ('pending', 'running', ...),
  'stopped' (its job left the queue before the last step), 'unfinished' (a run directory
  without a job) or 'not started'."""
  if is_finished(workdir):
    return "finished"
  if record:
    return queued.get(record["job_id"], "stopped").lower()
  return "unfinished" if storage.isdir(workdir) else "not started"


def status_rows(root, selected):
  """Per selected point: point, state, step, its last eval metrics and its SLURM job id."""
  records = {n: jobs.read_record(os.path.join(root, n)) for n, _ in selected}
  try:
    queued = jobs.queue() if any(records.values()) else {}
  except SlurmError as e:
    cli.fail(f"sweep: {e}", status=1)
  rows = []
  for name, _ in selected:
    workdir, record = os.path.join(root, name), records[name]
    metrics = final_metrics(workdir)
    rows.append({"point": name, "state": point_state(workdir, record, queued),
                 "step": metrics.get("step", ""),
                 **{k: v for k, v in metrics.items() if k.startswith("eval_")},
                 "job": record["job_id"] if record else ""})
  return rows


def print_status(root, names, selected):
  rows = status_rows(root, selected)
  evals = [k for k in SUMMARY_KEYS if k.startswith("eval_") and any(k in r for r in rows)]
  print(markdown(rows, ["point", "state", "step", *evals, "job"]))
  if storage.isdir(root):
    summarize(root, names)


def sweep_args():
  """The flags that name the sweep's points, as the batch script passes them on."""
  only = [f"--only={_ONLY.value}"] if _ONLY.value else []
  return [f"--config={_CONFIG.value}", f"--workdir={_WORKDIR.value}",
          *(f"--set={item}" for item in _SET.value), *only]


def sbatch_options():
  """The words of --sbatch_args; exits 2 when they do not split (an unclosed quote)."""
  try:
    return shlex.split(_SBATCH_ARGS.value)
  except ValueError as e:
    cli.fail(f"flag error: --sbatch_args={_SBATCH_ARGS.value}: {e}")


def submit_slurm(root, names, selected):
  """Submits the idle selected points as one job array; records its job in each point."""
  todo = []
  for row in status_rows(root, selected):
    if row["state"] in IDLE:
      todo.append(row["point"])
    else:
      job = f" (job {row['job']})" if row["job"] else ""
      print(f"[{row['point']}] {row['state']}{job}, skipped", flush=True)
  if not todo:
    print("sweep: nothing to submit")
    return
  log_dir = os.path.join(root, "slurm_logs")
  try:
    job = jobs.submit_array(_SBATCH_SCRIPT.value, [names.index(n) for n in todo],
                            ["--sweep", *sweep_args()], sbatch_options(), log_dir)
  except SlurmError as e:
    cli.fail(f"sweep: {e}")
  for name in todo:
    task = f"{job}_{names.index(name)}"
    jobs.write_record(os.path.join(root, name), task, os.path.join(log_dir, f"{task}.out"))
    print(f"[{name}] submitted: job {task}", flush=True)


def exec_array_task(root, names, points, extra):
  """Replaces this process by `launch.train` of the point of SLURM_ARRAY_TASK_ID."""
  index = os.environ.get("SLURM_ARRAY_TASK_ID", "")
  if not index.isdigit() or int(index) >= len(points):
    cli.fail(f"flag error: --array_task needs SLURM_ARRAY_TASK_ID in 0..{len(points) - 1}, got "
             f"{index!r}")
  name, overrides = names[int(index)], points[int(index)]
  cmd = train_command(_CONFIG.value, os.path.join(root, name), {**overrides, **extra})
  if os.environ.get("SLURM_PROCID", "0") == "0":  # once per array task
    print(f"[{name}] {shlex.join(cmd)}", flush=True)
  os.execv(cmd[0], cmd)


def check_modes():
  """Exits 2 when the flags ask for two ways of running at once."""
  modes = [f"--{f.name}" for f in (_PRINT_ONLY, _IN_PROCESS, _STATUS, _ARRAY_TASK) if f.value]
  if _LAUNCHER.value == "slurm":
    modes.append("--launcher=slurm")
  elif flags.FLAGS["sbatch_args"].present or flags.FLAGS["sbatch_script"].present:
    cli.fail("flag error: --sbatch_args and --sbatch_script need --launcher=slurm")
  if len(modes) > 1 and modes != ["--status", "--launcher=slurm"]:
    cli.fail(f"flag error: {' and '.join(modes)} do not go together")


def main(argv):
  cli.no_extra_args(argv)
  if not _CONFIG.value or not _WORKDIR.value:
    cli.fail("flag error: --config and --workdir are required")
  check_modes()
  sbatch_options()
  script = [("sbatch_script", _SBATCH_SCRIPT.value)] if _LAUNCHER.value == "slurm" else []
  cli.check_paths(inputs=script, buckets_ok=[("workdir", _WORKDIR.value)])
  if _LAUNCHER.value == "slurm" and storage.is_url(_WORKDIR.value):
    cli.fail(f"flag error: --launcher=slurm writes the job logs into {_WORKDIR.value}/slurm_logs, "
             "which SLURM needs on a file system: give a shared file-system --workdir")
  module = load_module(_CONFIG.value)
  points = module.get_sweep()
  extra = parse_set(_SET.value)
  names = [point_name(p) for p in points]
  if len(set(names)) != len(names):
    cli.fail("config error: get_sweep() declares the same point twice")
  if _ARRAY_TASK.value:
    exec_array_task(_WORKDIR.value, names, points, extra)
  try:
    selected = [(n, p) for n, p in zip(names, points) if re.search(_ONLY.value or "", n)]
  except re.error as e:
    cli.fail(f"flag error: --only is not a regular expression: {e}")
  if not selected:
    cli.fail(f"flag error: --only={_ONLY.value} matches none of: {', '.join(names)}")
  if _STATUS.value:
    print_status(_WORKDIR.value, names, selected)
    return
  commands = [train_command(_CONFIG.value, os.path.join(_WORKDIR.value, n), {**p, **extra})
              for n, p in selected]
  if _PRINT_ONLY.value:
    for cmd in commands:
      print(shlex.join(cmd))
    return
  storage.makedirs(_WORKDIR.value)
  if _LAUNCHER.value == "slurm":
    submit_slurm(_WORKDIR.value, names, selected)
    return
  failed = []
  if _IN_PROCESS.value:
    failed = run_in_process(module, _WORKDIR.value, selected, extra)
    commands = []
  for (name, _), cmd in zip(selected, commands):
    workdir = os.path.join(_WORKDIR.value, name)
    if is_finished(workdir):
      print(f"[{name}] finished, skipped", flush=True)
      continue
    print(f"[{name}] {'resuming' if storage.isdir(workdir) else 'starting'}: {shlex.join(cmd)}",
          flush=True)
    if subprocess.run(cmd).returncode != 0:
      failed.append(name)
  print(summarize(_WORKDIR.value, names))
  if failed:
    cli.fail(f"sweep: {len(failed)} point(s) failed: {', '.join(failed)}", status=1)


if __name__ == "__main__":
  cli.run(main)
