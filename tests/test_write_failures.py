"""Files a run cannot write: a failed checkpoint save (a real write error from the storage, here
the kernel's file-size limit) or metrics write ends the run with one line and a non-zero
status; the next run resumes bit-identically from the newest complete checkpoint."""

import errno
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ftjax import checkpoint, loop, metrics
from tests.conftest import REPO, resolved
from tests.test_fault_tolerance import _rows, _train_cmd
from ftjax.trainer import load_run


def _limit_file_size(max_bytes):
  def preexec():  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
  return preexec


def test_failed_background_save_is_one_line_and_the_next_run_resumes(tiny_cfg, tmp_path,
                                                                    monkeypatch):
  cfg = resolved(tiny_cfg, **{"train.num_samples": 0, "train.peak_flops": 1.0,
                              "train.log_every": 1, "checkpoint.every_steps": 4})
  ref = loop.train_and_evaluate(cfg, str(tmp_path / "ref"), log=lambda *_: None)
  write_checksums = checkpoint.write_checksums

  def disk_full_at_step_12(step_dir, hashed):  # in the save's background thread, before the commit
    if os.path.basename(step_dir).startswith("12."):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), step_dir)
    write_checksums(step_dir, hashed)

  monkeypatch.setattr(checkpoint, "write_checksums", disk_full_at_step_12)
  run = str(tmp_path / "run")
  with pytest.raises(checkpoint.SaveError) as failure:
    loop.train_and_evaluate(cfg, run, log=lambda *_: None)
  message = str(failure.value)
  assert "\n" not in message and "cannot save the checkpoint of step 12" in message
  assert "No space left on device" in message
  assert "The newest complete checkpoint is step 8" in message
  assert checkpoint.committed_steps(os.path.join(run, "checkpoints")) == [4, 8]
  monkeypatch.undo()
  logs = []
  state = loop.train_and_evaluate(cfg, run, log=logs.append)
  assert "resumed from step 8" in logs
  assert _rows(run) == _rows(tmp_path / "ref")
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params),
                         jax.device_get(ref.params))


@pytest.mark.slow
def test_failed_save_is_one_line_and_the_next_run_resumes_bit_identically(tmp_path):
  ref = subprocess.run(_train_cmd(tmp_path / "ref"), cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert ref.returncode == 0, ref.stderr[-3000:]
  run = tmp_path / "run"
  first = subprocess.run(_train_cmd(run, "--stop_at=8"), cwd=REPO, capture_output=True,
                         text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  # Checkpoint files of the tiny model reach 36-170 kB; metrics and config stay under 30 kB.
  start = time.monotonic()
  failing = subprocess.run(_train_cmd(run), cwd=REPO, capture_output=True, text=True,
                           timeout=300, preexec_fn=_limit_file_size(30_000))
  assert failing.returncode == 1, failing.stderr[-3000:]
  lines = [line for line in failing.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, failing.stderr[-5000:]  # no traceback flood
  assert "cannot save the checkpoint of step 12" in lines[0]
  assert "File too large" in lines[0]
  assert "The newest complete checkpoint is step 8" in lines[0]
  assert "run the same command to resume" in lines[0]
  # Promptly: once the background save has failed, or at the latest when the next one is due.
  assert max(r["step"] for r in _rows(run)) <= 16
  assert time.monotonic() - start < 120
  again = subprocess.run(_train_cmd(run), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step 8" in again.stdout
  # (--stop_at=8 also evaluated at step 8: that row is not in the uninterrupted run)
  assert [r for r in _rows(run) if "loss" in r or r["step"] != 8] == _rows(tmp_path / "ref")
  (_, ref_state), (_, state) = (load_run(str(tmp_path / "ref")),
                                load_run(str(run)))
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params),
                         jax.device_get(ref_state.params))


def test_unwritable_run_directory_is_one_line(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  result = subprocess.run(_train_cmd(blocker / "run"), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 1
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "cannot write" in lines[0] and "Not a directory" in lines[0], lines


def test_metrics_write_failure_stops_the_run(tiny_cfg, tmp_path, monkeypatch):
  class FullDisk:
    def __init__(self, f):
      self._f, self.rows = f, 0

    def write(self, text):
      self.rows += 1
      if self.rows > 6:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return self._f.write(text)

    def __getattr__(self, name):
      return getattr(self._f, name)

  init = metrics.MetricWriter.__init__

  def failing_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self._jsonl = FullDisk(self._jsonl)

  monkeypatch.setattr(metrics.MetricWriter, "__init__", failing_init)
  cfg = resolved(tiny_cfg, **{"train.num_samples": 0, "train.peak_flops": 1.0,
                              "train.log_every": 1, "checkpoint.every_steps": 4})
  with pytest.raises(metrics.WriteError, match=r"metrics.jsonl at step 7: No space left"):
    loop.train_and_evaluate(cfg, str(tmp_path), log=lambda *_: None)
  assert checkpoint.Manager(tmp_path / "checkpoints", read_only=True).all_steps() == [4]


def test_free_space_warning():
  assert loop._free_space_warning("/", 3, 1) is None
  free = __import__("shutil").disk_usage("/").free
  warning = loop._free_space_warning("/", 3, free // 2)
  assert warning.startswith("warning:") and "checkpoint.keep=3 + 1 checkpoints" in warning


def test_metrics_file_reads_back_skipping_a_torn_line_and_resume_drops_later_rows(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 4, "lo')  # a write torn by a kill
  assert metrics.read_rows(str(tmp_path)) == [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
  metrics.MetricWriter(str(tmp_path), resume_step=2).close()
  assert [r["step"] for r in metrics.read_rows(str(tmp_path))] == [1, 2]
  assert metrics.read_rows(str(tmp_path / "no_run")) == []
