"""Which commit changed a run's numbers? Trains one sweep point with the code of each given commit
for a few steps and writes their logged rows side by side. Run from the repository root:

  python -m experiments.code_drift --config=experiments/kappa_study.py \
      --only='^seed=0,post_sampler=bits,kappa_bits=0\\.25$' --steps=250 --cpus=0,1 \
      --out=experiments/results/kappa_time/code_drift/kappa_0.25 5dd9c59 HEAD

Each commit's tree is checked out (`git worktree add --detach`) into a temporary directory and
trains the point with its own launch.sweep and its own copy of the sweep file (`--in_process`).
The process is killed at its first metrics.jsonl row past --steps, so the rows up to --steps
(eval included) are complete and the learning-rate schedule is the full run's. With --cpus the
runs are pinned (`taskset`), one commit per core at a time. Writes <out>/<commit>/config.json and
metrics.jsonl (the rows up to --steps) and <out>/drift.csv: per logged step and key, each
commit's value and the relative difference to the first commit's. A commit that fails to train
is reported with its log's last line and left out of the table.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from experiments.kappa_results import write_csv
from ftjax import metrics


def git(*args, cwd="."):
  return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                        text=True).stdout.strip()


def point_dir(workdir):
  """The one run directory under a sweep's workdir (None before it exists)."""
  names = [n for n in os.listdir(workdir) if os.path.isdir(os.path.join(workdir, n))]
  return os.path.join(workdir, names[0]) if len(names) == 1 else None


def log_path(workdir):
  """The training process's output, beside its sweep workdir."""
  return os.path.join(os.path.dirname(workdir), "log.txt")


def start(tree, workdir, args, cpu):
  """A launch.sweep process training the point with the code of `tree`, pinned to `cpu`."""
  cmd = [sys.executable, "-m", "launch.sweep", f"--config={args.config}", f"--workdir={workdir}",
         f"--only={args.only}"]
  env = dict(os.environ, PYTHONPATH=tree)
  points = subprocess.run([*cmd, "--print_only"], cwd=tree, env=env, capture_output=True,
                          text=True).stdout.splitlines()
  if len(points) != 1:
    sys.exit(f"code_drift: --only={args.only} names {len(points)} points of the sweep at "
             f"{os.path.basename(os.path.dirname(tree))}, not one")
  cmd.append("--in_process")
  if cpu is not None:
    cmd = ["taskset", "-c", str(cpu), *cmd]
  with open(log_path(workdir), "w", encoding="utf-8") as log:
    return subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def reached(workdir, steps):
  run = point_dir(workdir)
  rows = metrics.read_rows(run) if run else []
  return any(r.get("step", 0) > steps for r in rows)


def train_commits(commits, args, tmp):
  """Trains the point with each commit's code to --steps; {commit: run directory}."""
  cpus = args.cpus.split(",") if args.cpus else [None]
  pending, running, runs = list(commits), {}, {}
  try:
    poll(pending, running, runs, cpus, args, tmp)
  finally:
    for proc, _, _ in running.values():
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  return runs


def poll(pending, running, runs, cpus, args, tmp):
  """Starts the pending commits on free cores and collects those that reached --steps."""
  while pending or running:
    while pending and len(running) < len(cpus):
      commit = pending.pop(0)
      tree = os.path.join(tmp, commit, "tree")
      git("worktree", "add", "--detach", tree, commit)
      workdir = os.path.join(tmp, commit, "runs")
      os.makedirs(workdir)
      free = [c for c in cpus if c not in {cpu for _, _, cpu in running.values()}]
      running[commit] = (start(tree, workdir, args, free[0]), workdir, free[0])
      print(f"{commit}: training on cpu {free[0]}", flush=True)
    time.sleep(1)
    for commit, (proc, workdir, _) in list(running.items()):
      if reached(workdir, args.steps):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        runs[commit] = point_dir(workdir)
        del running[commit]
        print(f"{commit}: step {args.steps} reached", flush=True)
      elif proc.poll() is not None:
        with open(log_path(workdir), encoding="utf-8") as f:
          last = (f.read().strip().splitlines() or ["(no output)"])[-1]
        print(f"{commit}: stopped before step {args.steps}: {last}", flush=True)
        del running[commit]


def drift_rows(rows_by_commit, first):
  """Per logged step and key: each commit's value and its relative difference to `first`'s."""
  table = []
  for step, key in sorted({(r["step"], k) for rows in rows_by_commit.values() for r in rows
                           for k in r if k != "step"}):
    ref = next((r[key] for r in rows_by_commit[first] if r["step"] == step and key in r), None)
    for commit, rows in rows_by_commit.items():
      value = next((r[key] for r in rows if r["step"] == step and key in r), None)
      if value is None:
        continue
      rel = "" if ref is None else abs(value - ref) / max(abs(ref), 1e-30)
      table.append({"step": step, "key": key, "commit": commit, "value": repr(value),
                    "rel_diff_to_first": rel})
  return table


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("commits", nargs="+", help="Commits to compare (the first is the reference).")
  parser.add_argument("--config", required=True, help="Sweep file, relative to the repository.")
  parser.add_argument("--only", required=True, help="Regular expression naming one point.")
  parser.add_argument("--steps", type=int, default=1, help="Keep the rows up to this step.")
  parser.add_argument("--cpus", default="", help="Cores to pin the runs to, e.g. 0,1.")
  parser.add_argument("--out", required=True, help="Folder for the rows and drift.csv.")
  args = parser.parse_args(argv)
  try:
    commits = [git("rev-parse", "--short", "--verify", c + "^{commit}") for c in args.commits]
  except subprocess.CalledProcessError as e:
    sys.exit(f"code_drift: not a commit of this repository: {e.stderr.strip()}")
  tmp = tempfile.mkdtemp(prefix="code_drift_")
  try:
    runs = train_commits(commits, args, tmp)
    rows_by_commit = {}
    for commit in commits:
      if commit not in runs:
        continue
      rows = [r for r in metrics.read_rows(runs[commit]) if r["step"] <= args.steps]
      rows_by_commit[commit] = rows
      os.makedirs(os.path.join(args.out, commit), exist_ok=True)
      shutil.copy(os.path.join(runs[commit], "config.json"), os.path.join(args.out, commit))
      with open(os.path.join(args.out, commit, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
  finally:
    for commit in commits:
      tree = os.path.join(tmp, commit, "tree")
      if os.path.exists(tree):
        git("worktree", "remove", "--force", tree)
    shutil.rmtree(tmp, ignore_errors=True)
  if not rows_by_commit:
    sys.exit("code_drift: no commit trained to --steps")
  table = drift_rows(rows_by_commit, next(iter(rows_by_commit)))
  write_csv(os.path.join(args.out, "drift.csv"), table)
  for row in table:
    if row["key"] in ("loss", "kl", "eval_kl", "eval_z_use"):
      print(f"step {row['step']:5d} {row['key']:10s} {row['commit']:>9s} {row['value']:>24s} "
            f"{row['rel_diff_to_first']}")


if __name__ == "__main__":
  main()
