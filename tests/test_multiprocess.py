"""Two processes on localhost (CPU, gloo collectives) train like one process with both devices."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO
from ftjax.trainer import load_run

FLAGS = ["--config=experiments/tiny.py", "--config.mesh.data=2", "--config.train.steps=6",
         "--config.train.log_every=1", "--config.train.eval_every=6",
         "--config.train.peak_flops=1e9", "--config.train.num_samples=0"]


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("device_count=8", f"device_count={devices}")
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["loss"]) for r in rows if "loss" in r], [r for r in rows if "eval_ce" in r]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(module, *args, count=2):
  """`python -m module args` as processes 0..count-1 of one run on localhost (one CPU device
  each, a fresh coordinator port)."""
  port = _free_port()
  return [subprocess.Popen([sys.executable, "-m", module, *args,
                            f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}",
                            f"--process_id={i}"], cwd=REPO, env=_env(1),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(count)]


def finish(procs):
  """Each process's (stdout, stderr), once all have exited with status 0."""
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  single = subprocess.run([sys.executable, "-m", "launch.train", *FLAGS,
                           f"--workdir={tmp_path / 'single'}"], cwd=REPO, env=_env(2),
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  outs = finish(start_processes("launch.train", *FLAGS, f"--workdir={tmp_path / 'multi'}"))
  assert "step 6/6" in outs[0][0] and "step 6/6" not in outs[1][0]  # process 0 logs
  single_losses, single_eval = _losses(tmp_path / "single")
  multi_losses, multi_eval = _losses(tmp_path / "multi")
  assert [s for s, _ in multi_losses] == [s for s, _ in single_losses]
  for (_, a), (_, b) in zip(multi_losses, single_losses):
    assert abs(a - b) <= 1e-5 * abs(b)
  assert abs(multi_eval[-1]["eval_ce"] - single_eval[-1]["eval_ce"]) <= 1e-5


@pytest.mark.slow
def test_two_process_hf_import_matches_transformers(tmp_path):
  """launch.import_hf in two processes (fsdp over their two devices): process 0 writes the run
  files, each reads its own shards; the run restores in one process with transformers' logits."""
  import numpy as np
  from tests.test_hf import UNTIED, logits
  run = tmp_path / "run"
  outs = finish(start_processes("launch.import_hf", f"--hf_dir={UNTIED}", f"--workdir={run}",
                                "--config=experiments/tiny.py", "--config.mesh.fsdp=2",
                                "--config.mesh.data=1"))
  assert "imported" in outs[0][0] + outs[0][1] and "imported" not in outs[1][0] + outs[1][1]
  trainer, state = load_run(str(run))  # verifies every file's checksum
  expected = np.load(os.path.join(UNTIED, "expected.npz"))
  np.testing.assert_allclose(logits(trainer.cfg, state.params, expected["tokens"], "zero"),
                             expected["logits"], atol=1e-4, rtol=1e-4)
