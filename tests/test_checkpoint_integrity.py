"""Checkpoint integrity: flipped bytes in any kind of file of a step are detected, the restore
falls back to the previous step (and training resumes bit-identically from it), launchers
refuse a damaged step, an undamaged checkpoint restores bit-identically; two processes each hash
the files they wrote into one manifest."""

import glob
import json
import os
import random
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ftjax import checkpoint, integrity, loop
from ftjax.trainer import Trainer, load_run
from tests.conftest import resolved

TIMING = ("tokens_per_sec", "mfu")
OVERRIDES = {"train.num_samples": 0, "train.peak_flops": 1.0, "checkpoint.every_steps": 5,
             "train.log_every": 1}


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _leaves_equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run saved at steps 10, 15, 20, its final state and config (never modified)."""
  from experiments import tiny
  from ftjax.configs import resolve
  cfg = resolve(tiny.get_config())
  cfg.unlock()
  cfg = resolved(cfg, **OVERRIDES)
  workdir = tmp_path_factory.mktemp("run")
  state = loop.train_and_evaluate(cfg, str(workdir), log=lambda *_: None)
  return cfg, workdir, jax.device_get(state)


def _copy(trained, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(trained[1], run)
  return run


def _flip(path, seed=0, count=3):
  """XORs `count` bytes at random offsets of `path` (each byte then surely differs)."""
  data = bytearray(open(path, "rb").read())
  rng = random.Random(seed)
  for offset in rng.sample(range(len(data)), min(count, len(data))):
    data[offset] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


def _largest(pattern):
  return max(glob.glob(pattern, recursive=True), key=os.path.getsize)


KINDS = {  # one file of each kind of the newest step (20)
    "array_data": lambda run: _largest(f"{run}/checkpoints/20/state/**/d/*"),
    "array_metadata": lambda run: f"{run}/checkpoints/20/state/_METADATA",
    "step_metadata": lambda run: f"{run}/checkpoints/20/_CHECKPOINT_METADATA",
    "data_state": lambda run: f"{run}/checkpoints/data_state/20.process0.json",
    "saved_config": lambda run: f"{run}/checkpoints/20/config/metadata",
    "checksums": lambda run: f"{run}/checkpoints/20/checksums.json",
}


def test_undamaged_checkpoint_restores_bit_identically(trained):
  cfg, workdir, final = trained
  manager = checkpoint.Manager(workdir / "checkpoints", read_only=True)
  assert manager.all_steps() == [10, 15, 20]
  assert os.path.exists(workdir / "checkpoints" / "20" / checkpoint.CHECKSUMS)
  trainer, state = load_run(str(workdir), optimizer=True)
  assert int(state.step) == 20
  _leaves_equal(state.params, final.params)
  _leaves_equal(state.opt_state, final.opt_state)
  _, params_only = load_run(str(workdir))  # what sampling and evaluation read
  _leaves_equal(params_only.params, final.params)
  _leaves_equal(params_only.latent_ctl, final.latent_ctl)
  opt_leaves = jax.tree_util.tree_leaves(params_only.opt_state)
  assert opt_leaves and all(leaf is ocp.PLACEHOLDER for leaf in opt_leaves)


@pytest.mark.parametrize("kind", list(KINDS))
def test_flipped_bytes_are_detected_and_skipped(trained, tmp_path, kind):
  cfg, _, _ = trained
  run = _copy(trained, tmp_path)
  damaged = KINDS[kind](run)
  _flip(damaged)
  warnings = []
  trainer = Trainer.create(cfg)
  state, data_state = checkpoint.Manager(run / "checkpoints", read_only=True,
                                         log=warnings.append).restore(None,
                                                                      trainer.abstract_state())
  assert int(state.step) == 15 and data_state == {"step": 15}
  assert len(warnings) == 1, warnings
  assert "step 20" in warnings[0] and "damaged" in warnings[0]
  assert os.path.basename(damaged) in warnings[0]  # names the file
  _, undamaged = load_run(str(trained[1]), step=15, optimizer=True)
  _leaves_equal(state, undamaged)
  with pytest.raises(checkpoint.CheckpointError, match=r"step 20 .* is damaged .*older steps"):
    load_run(str(run))  # launch.sample / launch.evaluate: refused, one line


def test_fallback_resumes_bit_identically(trained, tmp_path):
  cfg, _, final = trained
  run = _copy(trained, tmp_path)
  _flip(KINDS["array_data"](run), seed=1)
  logs = []
  state = loop.train_and_evaluate(cfg, str(run), log=logs.append)
  assert "resumed from step 15" in logs
  assert sum("damaged" in line for line in logs) == 1
  assert _rows(run) == _rows(trained[1])
  _leaves_equal(state.params, final.params)


def test_missing_checksums(trained, tmp_path):
  cfg, _, _ = trained
  run = _copy(trained, tmp_path)
  trainer = Trainer.create(cfg)
  os.remove(run / "checkpoints" / "20" / checkpoint.CHECKSUMS)  # saved with checksums: damaged
  warnings = []
  state, _ = checkpoint.Manager(run / "checkpoints", read_only=True,
                                log=warnings.append).restore(None, trainer.abstract_state())
  assert int(state.step) == 15 and "checksums.json: missing" in warnings[0]
  # A run saved before checksums existed: restored unverified, with a warning.
  os.remove(run / "checkpoints" / checkpoint.CHECKSUMS_SINCE)
  for path in glob.glob(f"{run}/checkpoints/*/{checkpoint.CHECKSUMS}"):
    os.remove(path)
  warnings = []
  state, _ = checkpoint.Manager(run / "checkpoints", read_only=True,
                                log=warnings.append).restore(None, trainer.abstract_state())
  assert int(state.step) == 20 and len(warnings) == 1 and "unverified" in warnings[0]


def test_verify_off_skips_the_check(trained, tmp_path):
  cfg, _, _ = trained
  run = _copy(trained, tmp_path)
  path = KINDS["saved_config"](run)  # still valid JSON after the change: only checksums see it
  text = open(path).read()
  assert '"synthetic"' in text
  open(path, "w").write(text.replace('"synthetic"', '"synthetiX"'))
  trainer = Trainer.create(cfg)
  for verify, step in ((True, 15), (False, 20)):
    warnings = []
    manager = checkpoint.Manager(run / "checkpoints", resolved(cfg, **{"checkpoint.verify": verify}),
                                 read_only=True, log=warnings.append)
    state, _ = manager.restore(None, trainer.abstract_state())
    assert int(state.step) == step and len(warnings) == int(verify)


def test_large_files_are_hashed_by_segments_in_threads(tmp_path, monkeypatch):
  """A file over the segment size gets the SHA-256 of its segments' SHA-256s (any number of
  threads gives the same manifest); a flipped byte in any segment is found; a manifest with a
  whole-file SHA-256 (older checkpoints) still verifies."""
  import hashlib
  monkeypatch.setattr(integrity, "_SEGMENT", 1000)
  step_dir = tmp_path / "7"
  (step_dir / "d").mkdir(parents=True)
  big = os.urandom(3500)
  (step_dir / "d" / "big").write_bytes(big)
  (step_dir / "small").write_bytes(b"x" * 10)
  manifests = []
  for threads in (1, 4):
    monkeypatch.setattr(integrity, "HASH_THREADS", threads)
    integrity.write_checksums(str(step_dir))
    manifests.append(open(step_dir / integrity.CHECKSUMS, "rb").read())
    integrity.verify_files(str(step_dir))
  assert manifests[0] == manifests[1]
  files = json.loads(manifests[0].partition(b"\n")[2])["files"]
  segments = b"".join(hashlib.sha256(big[i:i + 1000]).digest() for i in range(0, 3500, 1000))
  assert files["d/big"] == [3500, integrity._SEGMENTED + hashlib.sha256(segments).hexdigest()]
  assert files["small"] == [10, hashlib.sha256(b"x" * 10).hexdigest()]
  for offset in (0, 2999, 3499):  # first, third and the short last segment
    damaged = bytearray(big)
    damaged[offset] ^= 0xFF
    (step_dir / "d" / "big").write_bytes(bytes(damaged))
    with pytest.raises(integrity.Unreadable, match="d/big: checksum mismatch"):
      integrity.verify_files(str(step_dir))
  (step_dir / "d" / "big").write_bytes(big)
  files["d/big"][1] = hashlib.sha256(big).hexdigest()  # a manifest written before segments
  integrity.write_checked(str(step_dir / integrity.CHECKSUMS), {"files": files})
  integrity.verify_files(str(step_dir))


def test_ready_made_entries_join_the_manifest(tmp_path):
  """write_checksums takes the entries another process made as they are, hashes the other
  files, and refuses an entry whose file is gone."""
  (tmp_path / "a").write_bytes(b"a" * 10)
  (tmp_path / "b").write_bytes(b"b" * 10)
  entries = integrity.file_entries(str(tmp_path), ["a"])
  integrity.write_checksums(str(tmp_path), dict(entries))
  integrity.verify_files(str(tmp_path))
  files = integrity.read_checked(str(tmp_path / integrity.CHECKSUMS))["files"]
  assert files == {**entries, **integrity.file_entries(str(tmp_path), ["b"])}
  with pytest.raises(FileNotFoundError, match="gone"):
    integrity.write_checksums(str(tmp_path), {**entries, "c": [1, "0" * 64]})


def test_two_processes_hash_their_own_files_into_one_manifest(tmp_path):
  """Each of two processes hashes only the array files it wrote (process 0 also the step's other
  files); the merged manifest covers every file and verifies; a damaged file of process 1 is
  found and both processes restore the step before."""
  from tests.test_multiprocess import finish, start_processes
  finish(start_processes("tests.checkpoint_pair", "save", str(tmp_path)))
  calls = [json.loads((tmp_path / f"hashed.process{i}.json").read_text()) for i in (0, 1)]
  step_dir = tmp_path / "checkpoints" / "2"
  files = integrity.read_checked(str(step_dir / integrity.CHECKSUMS))["files"]
  hashed = [[rel for call in calls[i] for rel in call] for i in (0, 1)]
  assert len(calls[1]) == 2 and all(  # one call per step, its OCDBT database and array metadata
      re.fullmatch(r"ocdbt\.process_1/.+|array_metadatas/process_1", rel) for rel in hashed[1])
  assert any(rel.startswith("ocdbt.process_0/d/") for rel in hashed[0])
  assert not any("process_1" in rel for rel in hashed[0])  # its own and the step's other files
  sent = {f"state/{rel}": entry for rel, entry in calls[1][-1].items()}  # step 2's
  assert any("/d/" in rel for rel in sent) and {rel: files[rel] for rel in sent} == sent
  integrity.verify_files(str(step_dir))  # every file on disk listed, every digest right
  damaged = _largest(f"{step_dir}/state/ocdbt.process_1/d/*")
  _flip(damaged)
  with pytest.raises(integrity.Unreadable, match=os.path.basename(damaged)):
    integrity.verify_files(str(step_dir))
  outs = finish(start_processes("tests.checkpoint_pair", "restore", str(tmp_path)))
  assert all("restored step 1" in out for out, _ in outs)
  assert "step 2" in outs[0][0]
  # the process whose share held the file names it
  assert os.path.basename(damaged) in "".join(out + err for out, err in outs)
