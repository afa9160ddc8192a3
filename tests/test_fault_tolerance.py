"""Checkpoints under failure: kill -9 and resume bit-identically, SIGTERM, damaged checkpoints,
changed shapes, a different device count, non-finite steps."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ftjax import checkpoint, loop
from ftjax.trainer import Trainer, load_run
from tests.conftest import REPO, resolved

TIMING = ("tokens_per_sec", "mfu")
# Host-side settings only: every run here shares the tiny config's compiled steps (20 of them).
FLAGS = ["--config=experiments/tiny.py", "--config.train.log_every=1",
         "--config.train.eval_every=10", "--config.checkpoint.every_steps=4",
         "--config.train.num_samples=0", "--config.train.peak_flops=1e9"]


def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "launch.train", *FLAGS, f"--workdir={workdir}", *extra]


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _last_step(workdir):
  try:
    return max((r["step"] for r in _rows(workdir)), default=0)
  except (OSError, json.JSONDecodeError):
    return 0


def _start(workdir, *extra):
  return subprocess.Popen(_train_cmd(workdir, *extra), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, workdir, step, timeout=240):
  deadline = time.time() + timeout
  while _last_step(workdir) < step and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)


def _final_params(workdir):
  _, state = load_run(str(workdir))
  return jax.device_get(state.params), int(state.step)


@pytest.mark.slow  # ~2 min cold; test_train's stop-and-resume and the fallback tests stay in CI
@pytest.mark.parametrize("latent", ["True", "False"], ids=["ft", "baseline"])
def test_kill_9_then_resume_is_bit_identical(tmp_path, latent):
  extra = [f"--config.model.latent.enabled={latent}"]
  ref = subprocess.run(_train_cmd(tmp_path / "ref", *extra), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert ref.returncode == 0, ref.stderr[-3000:]
  rng = random.Random(0 if latent == "True" else 1)
  run = tmp_path / "killed"
  kills = 0
  for target in sorted(rng.sample(range(2, 18), 3)):
    proc = _start(run, *extra)
    _wait_for_step(proc, run, target)
    time.sleep(rng.random() * 0.3)  # land anywhere: mid-step, mid-save, mid-eval
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.communicate()
  assert kills >= 2
  final = subprocess.run(_train_cmd(run, *extra), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
  assert final.returncode == 0, final.stderr[-3000:]
  assert _rows(run) == _rows(tmp_path / "ref")  # every metric of every step, bit for bit
  (ref_params, ref_step), (params, step) = _final_params(tmp_path / "ref"), _final_params(run)
  assert step == ref_step == 20
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref_params)


@pytest.mark.slow
def test_sigterm_saves_and_the_next_run_resumes(tmp_path):
  proc = _start(tmp_path)
  _wait_for_step(proc, tmp_path, 5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped by a signal at step" in out
  stopped = int(out.split("stopped by a signal at step ")[1].split(":")[0])
  assert stopped in checkpoint.Manager(tmp_path / "checkpoints", read_only=True).all_steps()
  again = subprocess.run(_train_cmd(tmp_path), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0 and f"resumed from step {stopped}" in again.stdout


def _trained(tiny_cfg, workdir, **overrides):
  cfg = resolved(tiny_cfg, **{"train.num_samples": 0, "train.peak_flops": 1.0,
                              "checkpoint.every_steps": 5, **overrides})
  return cfg, loop.train_and_evaluate(cfg, str(workdir), log=lambda *_: None)


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tiny_cfg, tmp_path):
  cfg, _ = _trained(tiny_cfg, tmp_path)
  ckpt_dir = tmp_path / "checkpoints"
  manager = checkpoint.Manager(ckpt_dir, read_only=True)
  assert manager.all_steps() == [10, 15, 20]
  for root, _, files in os.walk(ckpt_dir / "20" / "state"):  # truncate every data file
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(max(os.path.getsize(f.name) // 3, 1))
  warnings = []
  trainer = Trainer.create(cfg)
  state, data_state = checkpoint.Manager(ckpt_dir, read_only=True, log=warnings.append).restore(
      None, trainer.abstract_state())
  assert int(state.step) == 15 and data_state == {"step": 15}
  assert len(warnings) == 1 and "step 20" in warnings[0] and "unreadable" in warnings[0]


def test_changed_shapes_are_a_clear_error(tiny_cfg, tmp_path):
  cfg, _ = _trained(tiny_cfg, tmp_path)
  wider = resolved(cfg, **{"model.mlp_dim": 96})
  message = r"params/inject_block/mlp/down/kernel: checkpoint \(64, 32\), config \(96, 32\)"
  with pytest.raises(checkpoint.CheckpointError, match=message):
    loop.train_and_evaluate(wider, str(tmp_path), log=lambda *_: None)


def test_restore_on_a_different_device_count_gives_the_same_eval(tiny_cfg, tmp_path):
  cfg, _ = _trained(tiny_cfg, tmp_path, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                           "train.batch_size": 8})
  saved_eval = [r for r in _rows(tmp_path) if "eval_ce" in r][-1]
  trainer, state = load_run(str(tmp_path))  # one device
  assert trainer.mesh.devices.size == 1
  ev = trainer.evaluate(state.params)
  assert abs(ev["eval_ce"] - saved_eval["eval_ce"]) < 1e-5
  assert abs(ev["eval_elbo"] - saved_eval["eval_elbo"]) < 1e-5


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_nonfinite_steps_are_skipped_or_stop_the_run(tiny_cfg, tmp_path, mode):
  overrides = {"train.lr": 1e35, "train.warmup_steps": 0, "train.on_nonfinite": mode}
  if mode == "stop":
    with pytest.raises(loop.NonFiniteError, match=r"non-finite loss or gradients at step \d+"):
      _trained(tiny_cfg, tmp_path, **overrides)
    return
  _, state = _trained(tiny_cfg, tmp_path, **overrides)
  assert int(state.nonfinite_steps) > 0
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(jax.device_get(state.params)))
