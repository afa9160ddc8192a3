"""`pip install .` gives a user the launchers as commands that run outside the repository,
with the shipped experiment configs."""

import os
import shutil
import subprocess
import sys

from tests.conftest import REPO


def test_installed_commands_run_outside_the_repository(tmp_path):
  source, target = tmp_path / "source", tmp_path / "site"  # a copy: the build writes next to it
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
      ".git", "runs", "results", "tests", "build", "*.egg-info", "__pycache__", ".jax_cache",
      "workdir*", "benchmarks", "docs"))
  install = subprocess.run(
      [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
       str(source)],
      capture_output=True, text=True, timeout=600)
  assert install.returncode == 0, install.stderr[-3000:]
  for name in ("ftjax-train", "ftjax-sample", "ftjax-prepare-data", "ftjax-lm-eval"):
    assert (target / "bin" / name).exists(), name
  assert (target / "launch" / "slurm" / "train_gpu.sbatch").exists()
  env = {**os.environ, "PYTHONPATH": str(target)}
  away = tmp_path / "elsewhere"
  away.mkdir()

  def command(name, *flags):
    return subprocess.run([sys.executable, str(target / "bin" / name), *flags], cwd=away,
                          env=env, capture_output=True, text=True, timeout=600)

  keys = command("ftjax-train", "--config_help")
  assert keys.returncode == 0 and "model.latent.kappa_bits" in keys.stdout, keys.stderr[-2000:]
  assert "--z_seed" in command("ftjax-sample", "--helpfull").stdout
  # The shipped config is found by name (and by its repository path) and checked: one line.
  for config in ("synthetic_z", "experiments/synthetic_z.py"):
    bad = command("ftjax-train", f"--config={config}", f"--workdir={away / 'run'}",
                  "--config.model.num_layers=0")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "model.num_layers" in lines[0], bad.stderr
  missing = command("ftjax-train", "--config=no_such_experiment", f"--workdir={away / 'run'}")
  assert missing.returncode == 2 and "cannot load the --config file" in missing.stderr
