"""launch.sweep: runs every point, skips finished ones, resumes interrupted ones, summarises."""

import csv
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

SWEEP = "tests/sweep_tiny.py"


def _sweep(root, *flags, env=None):
  return subprocess.run([sys.executable, "-m", "launch.sweep", f"--config={SWEEP}",
                         f"--workdir={root}", *flags], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=env)


@pytest.mark.parametrize("flags", [
    ("--status", "--print_only"), ("--launcher=slurm", "--in_process"),
    ("--launcher=slurm", "--array_task"), ("--sbatch_args=--nodes=2",),
    ("--launcher=slurm", "--sbatch_args='--nodes=2"),
    ("--launcher=slurm", "--sbatch_script=missing.sbatch"), ("--array_task",),
    ("--launcher=slurm",)])  # the last without SLURM's commands on PATH
def test_launcher_flag_errors_are_one_line(tmp_path, flags):
  env = dict(os.environ, PATH=os.path.dirname(sys.executable))
  done = _sweep(tmp_path, *flags, env=env)
  assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
  assert not os.listdir(tmp_path)


def test_a_sweep_file_that_does_not_load_or_has_no_points_is_one_line(tmp_path):
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  (tmp_path / "no_points.py").write_text("def get_config():\n  return None\n")
  for name, message in (("broken", "cannot load the sweep file"),
                        ("no_points", "defines no get_sweep()")):
    done = subprocess.run([sys.executable, "-m", "launch.sweep", f"--config={tmp_path}/{name}.py",
                           f"--workdir={tmp_path}/root"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
  assert not os.path.exists(tmp_path / "root")


@pytest.mark.slow  # launches three training processes; test_kl_control runs a sweep in-process
def test_sweep_runs_skips_and_resumes(tmp_path):
  printed = _sweep(tmp_path, "--print_only")
  assert printed.returncode == 0 and len(printed.stdout.strip().splitlines()) == 4
  assert "--config.train.eval_batches=2" in printed.stdout and not os.listdir(tmp_path)
  subset = _sweep(tmp_path, "--print_only", "--only=log_every=5")
  assert len(subset.stdout.strip().splitlines()) == 2 and "log_every=2" not in subset.stdout
  for bad in ("--only=(", "--only=log_every=3"):
    refused = _sweep(tmp_path, "--print_only", bad)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1

  first = _sweep(tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  points = sorted(p for p in os.listdir(tmp_path) if os.path.isdir(tmp_path / p))
  assert points == ["log_every=2,eval_batches=1", "log_every=2,eval_batches=2",
                    "log_every=5,eval_batches=1", "log_every=5,eval_batches=2"]
  with open(tmp_path / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 4 and all(r["step"] == "20" and float(r["eval_ce"]) > 0 for r in rows)
  assert (tmp_path / "summary.md").read_text().startswith("| point |")
  status = _sweep(tmp_path, "--status", "--only=log_every=2")
  assert status.returncode == 0 and status.stdout.count("| finished | 20 |") == 2, status.stdout

  interrupted = tmp_path / points[1]
  shutil.rmtree(interrupted / "checkpoints" / "20")  # as if killed after the step-15 checkpoint
  second = _sweep(tmp_path)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.count("finished, skipped") == 3
  assert f"[{points[1]}] resuming" in second.stdout and "resumed from step 15" in second.stdout
