"""Runs on object stores, against local emulators (tests/buckets.py): checkpoints commit by
marker, are checksummed and verified, damaged or uncommitted steps are refused, a missing bucket
is one line; a run killed (kill -9) or whose store goes away mid-save resumes bit-identically."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import checkpoint, integrity, storage
from tests.buckets import EMULATORS


@pytest.fixture(scope="module", params=sorted(EMULATORS))
def bucket(request):
  with EMULATORS[request.param]() as emulator:
    yield emulator


def _state():
  return {"w": jnp.arange(12.0).reshape(3, 4), "step": jnp.array(3, jnp.int32)}


def _abstract(state):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                state)


def test_small_files_and_listings_through_one_path_type(bucket):
  root = bucket.url()
  integrity.write_checked(os.path.join(root, "a", "state.json"), {"step": 3})
  assert integrity.read_checked(os.path.join(root, "a", "state.json")) == {"step": 3}
  storage.write_bytes(os.path.join(root, "a", "b", "c.bin"), b"xyz")
  assert storage.files_under(root) == ["a/b/c.bin", "a/state.json"]
  assert storage.size(os.path.join(root, "a", "b", "c.bin")) == 3
  assert sorted(storage.listdir(os.path.join(root, "a"))) == ["b", "state.json"]
  storage.remove(os.path.join(root, "a", "b", "c.bin"))
  assert not storage.exists(os.path.join(root, "a", "b", "c.bin"))


def test_a_checkpoint_on_a_bucket_saves_verifies_and_restores(bucket, tiny_cfg):
  directory = bucket.url()
  manager = checkpoint.Manager(directory, tiny_cfg)
  state = _state()
  manager.save(3, state, {"step": 3})
  manager.close()
  assert checkpoint.committed_steps(directory) == [3]
  assert storage.exists(os.path.join(directory, "3", integrity.CHECKSUMS))
  reader = checkpoint.Manager(directory, read_only=True)
  restored, data_state = reader.restore(None, _abstract(state))
  reader.close()
  assert data_state == {"step": 3}
  np.testing.assert_array_equal(restored["w"], state["w"])


def test_damaged_and_uncommitted_steps_on_a_bucket_are_not_restored(bucket, tiny_cfg):
  directory = bucket.url()
  manager = checkpoint.Manager(directory, tiny_cfg)
  for step in (1, 2):
    manager.save(step, _state(), {"step": step})
  manager.close()
  step_2 = os.path.join(directory, "2")
  data = [rel for rel in storage.files_under(step_2) if "/d/" in rel][0]
  raw = storage.read_bytes(os.path.join(step_2, data))
  storage.write_bytes(os.path.join(step_2, data), bytes([raw[0] ^ 0xFF]) + raw[1:])
  warnings = []
  reader = checkpoint.Manager(directory, read_only=True, log=warnings.append)
  _, data_state = reader.restore(None, _abstract(_state()))
  assert data_state == {"step": 1} and "step 2" in warnings[0]
  storage.remove(os.path.join(directory, "2", "commit_success.txt"))  # as if killed mid-save
  assert checkpoint.committed_steps(directory) == [1]
  checkpoint.Manager(directory, tiny_cfg).close()  # a writer removes the half-written step
  assert sorted(storage.listdir(directory)) == ["1", "checksums_since.json", "data_state"]


def test_a_missing_bucket_is_one_line(bucket):
  with pytest.raises(checkpoint.CheckpointError, match=f"the bucket {bucket.scheme}://no-such-bucket "
                                                       "does not exist"):
    checkpoint.Manager(f"{bucket.scheme}://no-such-bucket/run/checkpoints")


# ------------------------------------------------------------------ training runs on a bucket

HOST = {"train.steps": 8, "train.eval_every": 4, "train.log_every": 2, "train.num_samples": 0,
        "train.peak_flops": 1.0, "checkpoint.every_steps": 4}
TIMING = ("tokens_per_sec", "mfu")


def _rows(workdir):
  from ftjax import metrics
  return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics.read_rows(workdir)]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
  from experiments import tiny
  from ftjax import configs, loop
  from tests.conftest import resolved
  cfg = resolved(configs.resolve(tiny.get_config()), **HOST)
  workdir = str(tmp_path_factory.mktemp("local"))
  state = loop.train_and_evaluate(cfg, workdir, log=lambda *_: None)
  return cfg, jax.device_get(state.params), _rows(workdir)


def test_a_run_on_a_bucket_resumes_and_equals_the_local_run(bucket, local_run):
  from ftjax import loop, run
  cfg, params, rows = local_run
  workdir = bucket.url()
  loop.train_and_evaluate(cfg, workdir, log=lambda *_: None, stop_at=4)
  assert checkpoint.committed_steps(run.checkpoints_dir(workdir)) == [4]
  assert run.is_finished(workdir) is False
  lines = []
  state = loop.train_and_evaluate(cfg, workdir, log=lines.append)
  assert "resumed from step 4" in lines
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state.params)),
                  jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert _rows(workdir) == rows and run.is_finished(workdir)
  assert storage.exists(os.path.join(workdir, "tb")) or storage.files_under(workdir)
  restored = run.load_for_inference(workdir)  # sampling and export read the bucket's run
  assert restored.step == 8
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(restored.params)),
                  jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- the launchers

def _launch(bucket, module, *flags, env=None):
  import subprocess
  import sys
  from tests.conftest import REPO
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env={**os.environ, **bucket.env, **(env or {})})


def test_launchers_train_resume_and_sample_a_bucket_run(bucket):
  from tests.test_fault_tolerance import FLAGS
  workdir = bucket.url()
  first = _launch(bucket, "launch.train", *FLAGS, f"--workdir={workdir}", "--stop_at=8")
  assert first.returncode == 0, first.stderr[-2000:]
  again = _launch(bucket, "launch.train", *FLAGS, f"--workdir={workdir}")
  assert again.returncode == 0 and "resumed from step 8" in again.stdout, again.stderr[-2000:]
  sample = _launch(bucket, "launch.sample", f"--workdir={workdir}", "--num_samples=2")
  assert sample.returncode == 0 and sample.stdout.count(" -> ") == 2, sample.stderr[-2000:]


@pytest.mark.parametrize("case", ["no bucket", "no credentials"])
def test_a_missing_bucket_or_credentials_is_one_line_before_compiling(bucket, case):
  from tests.test_fault_tolerance import FLAGS
  if case == "no credentials" and bucket.scheme != "s3":
    pytest.skip("the GCS emulator takes any token")
  workdir = (f"{bucket.scheme}://no-such-bucket/run" if case == "no bucket" else bucket.url())
  env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE":
         "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"} if case == "no credentials" else {}
  result = _launch(bucket, "launch.train", *FLAGS, f"--workdir={workdir}", env=env)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
  assert ("does not exist" if case == "no bucket" else "credentials") in lines[0]
  assert "compiling" not in result.stdout


# ---------------------------------------------------------------------------- data on a bucket

def _upload_corpus(root, local):
  import gzip
  import json
  with gzip.open(local / "a.jsonl.gz", "wt", encoding="utf-8") as f:
    for i in range(60):
      f.write(json.dumps({"text": f"document {i} " + "ab" * (i % 7)}) + "\n")
  (local / "b.txt").write_text("\n".join(f"line {i} of b" for i in range(30)), encoding="utf-8")
  for name in ("a.jsonl.gz", "b.txt"):
    storage.write_bytes(storage.join(root, "in", name), (local / name).read_bytes())


def test_prepared_data_read_and_written_on_a_bucket_equals_the_local_one(bucket, tiny_cfg,
                                                                          tmp_path):
  from ftjax.data import make_source, prepared
  from tests.test_prepared import _cfg
  root = bucket.url()
  _upload_corpus(root, tmp_path)
  settings = dict(tokenizer="bytes", text_unit="line", docs_per_shard=16, validation_every=5)
  inputs = prepared.match_inputs(storage.join(root, "in", "*"))
  assert inputs == [storage.join(root, "in", "a.jsonl.gz"), storage.join(root, "in", "b.txt")]
  remote = storage.join(root, "data")
  meta = prepared.prepare(prepared.Settings(inputs=tuple(inputs), **settings), remote)
  local = prepared.prepare(prepared.Settings(
      inputs=(str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.txt")), **settings),
      str(tmp_path / "data"))
  assert meta["splits"] == local["splits"]
  assert sorted(storage.files_under(remote)) == sorted(storage.files_under(str(tmp_path / "data")))
  for split in prepared.SPLITS:  # read back through the cache folder, record for record
    a = prepared.ShardSource(remote, split, prepared.load_metadata(remote))
    b = prepared.ShardSource(str(tmp_path / "data"), split, local)
    assert len(a) == len(b) > 0
    for i in range(len(a)):
      np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])
  # An interrupted preparation (no metadata.json, a chunk's part missing) resumes on the bucket.
  storage.remove(storage.join(remote, prepared.METADATA))
  storage.remove(storage.join(remote, "parts", "00000-00001.json"))
  lines = []
  again = prepared.prepare(prepared.Settings(inputs=tuple(inputs), **settings), remote,
                           progress=lines.append)
  assert again == meta and "1 chunks written (5 done before)" in lines[-1]
  # Training batches from the bucket, alone and in a mixture, equal the local directory's.
  for key, value in (("data.path", remote), ("data.mixture", f"{remote}:1,{tmp_path}/data:1")):
    want = "data.path" if key == "data.path" else "data.mixture"
    local_value = value.replace(remote, str(tmp_path / "data"))
    batches = []
    for v in (value, local_value):
      stream = make_source(_cfg(tiny_cfg, **{want: v})).stream("train", 4, slice(None), 0, 1)
      batches.append([next(stream)["inputs"] for _ in range(2)])
      stream.close()
    np.testing.assert_array_equal(batches[0], batches[1])


def test_a_missing_data_bucket_is_one_data_error(bucket, tiny_cfg):
  from ftjax.data import make_source
  from ftjax.data.text import CorpusError
  from tests.test_prepared import _cfg
  with pytest.raises(CorpusError, match="does not exist"):
    make_source(_cfg(tiny_cfg, **{"data.path": f"{bucket.scheme}://no-such-bucket/data"}))


# ---------------------------------------------------------------------------- Hugging Face

def test_hf_import_from_and_export_to_a_bucket_equal_the_local_ones(bucket, tmp_path):
  from ftjax import hf, run
  from tests.test_hf import UNTIED, _tensors, config_for
  root = bucket.url()
  storage.upload_tree(UNTIED, storage.join(root, "hf"))
  assert hf.read_config(storage.join(root, "hf")) == hf.read_config(UNTIED)  # that file alone
  cfg = config_for(UNTIED)
  workdir = storage.join(root, "run")
  state = hf.import_run(storage.join(root, "hf"), workdir, cfg, log=lambda *_: None)
  for name in ("hf_config.json", "config.py", "hf_tokenizer/tokenizer.json"):
    assert storage.exists(storage.join(workdir, name)), name
  restored = run.load_for_inference(workdir)  # verified run files and parameters
  assert restored.step == 0
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(restored.params)),
                  jax.tree_util.tree_leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)
  tok = hf.run_tokenizer(workdir)  # the bucket run's HF tokenizer (sample --chat, lm_eval)
  import tokenizers
  want = tokenizers.Tokenizer.from_file(os.path.join(UNTIED, "tokenizer.json"))
  assert tok.encode("hello world") == want.encode("hello world", add_special_tokens=False).ids
  hf.import_run(UNTIED, str(tmp_path / "run"), cfg, log=lambda *_: None)
  out, local = storage.join(root, "export"), str(tmp_path / "export")
  hf.export(restored.params, cfg.model, out, run_dir=workdir)
  hf.export(restored.params, cfg.model, local, run_dir=str(tmp_path / "run"))
  assert storage.files_under(out) == storage.files_under(local)
  for rel in storage.files_under(local):
    assert storage.read_bytes(storage.join(out, rel)) == storage.read_bytes(
        os.path.join(local, rel)), rel


def test_prepare_data_launcher_reads_and_writes_a_bucket(bucket, tmp_path):
  root = bucket.url()
  _upload_corpus(root, tmp_path)
  flags = [f"--input={root}/in/*", f"--output={root}/data", "--text_unit=line",
           "--docs_per_shard=16", "--num_workers=1"]
  result = _launch(bucket, "launch.prepare_data", *flags)
  assert result.returncode == 0 and "train: " in result.stdout, result.stderr[-2000:]
  assert storage.exists(storage.join(root, "data", "metadata.json"))
  missing = _launch(bucket, "launch.prepare_data", *flags[:1],
                    f"--output={bucket.scheme}://no-such-bucket/data")
  lines = missing.stderr.strip().splitlines()
  assert missing.returncode == 2 and len(lines) == 1 and "does not exist" in lines[0], lines


def test_a_sweep_rooted_on_a_bucket_trains_skips_finished_points_and_summarizes(bucket):
  root = storage.join(bucket.url(), "sweep")
  flags = ["--config=tests/sweep_tiny.py", f"--workdir={root}", "--only=log_every=2,"]
  first = _launch(bucket, "launch.sweep", *flags, "--in_process")
  assert first.returncode == 0, first.stderr[-2000:]
  rows = storage.read_bytes(storage.join(root, "summary.csv")).decode().splitlines()
  assert len(rows) == 3 and rows[1].startswith("\"log_every=2,eval_batches=1\",20,"), rows
  again = _launch(bucket, "launch.sweep", *flags)
  assert again.returncode == 0 and again.stdout.count("finished, skipped") == 2, again.stdout
  status = _launch(bucket, "launch.sweep", *flags, "--status")
  assert status.returncode == 0 and status.stdout.count("| finished |") == 2, status.stdout
  slurm = _launch(bucket, "launch.sweep", *flags, "--launcher=slurm")
  assert slurm.returncode == 2 and "file-system --workdir" in slurm.stderr, slurm.stderr


# --------------------------------------------------- kill -9 and a store that goes away mid-save

def _interrupted_flags(workdir):
  """The launcher flags of the interrupted runs below: the tiny run of test_fault_tolerance,
  saved at every step (a kill or an outage lands in a save most of the time)."""
  from tests.test_fault_tolerance import FLAGS
  return [*FLAGS, "--config.checkpoint.every_steps=1", f"--workdir={workdir}"]


@pytest.fixture(scope="module")
def launched_local(tmp_path_factory):
  """The same launcher run, uninterrupted, in a local directory: (final parameters, final step,
  metrics rows)."""
  import subprocess
  import sys
  from tests.conftest import REPO
  from tests.test_fault_tolerance import _final_params
  workdir = str(tmp_path_factory.mktemp("launched_local"))
  result = subprocess.run([sys.executable, "-m", "launch.train", *_interrupted_flags(workdir)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  params, step = _final_params(workdir)
  return params, step, _rows(workdir)


def _start_training(emulator, workdir, logs):
  """The launcher on `workdir`, in the background; its stdout and stderr go to files in `logs`
  (a pipe nobody reads would block it)."""
  import subprocess
  import sys
  from tests.conftest import REPO
  logs.mkdir(parents=True, exist_ok=True)
  with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
    return subprocess.Popen([sys.executable, "-m", "launch.train", *_interrupted_flags(workdir)],
                            cwd=REPO, stdout=out, stderr=err, text=True,
                            env={**os.environ, **emulator.env})


def _steps_on(directory):
  """(committed steps, step directories without a commit marker) of a bucket's checkpoints; the
  listing comes first, so a step committed meanwhile counts as committed."""
  names = storage.listdir(directory)
  committed = checkpoint.committed_steps(directory)
  return committed, sorted(int(n) for n in names if n.isdigit() and int(n) not in committed)


@pytest.mark.slow  # ~2 min per emulator (three launcher starts), plus the shared local run
def test_kill_9_on_a_bucket_then_resume_is_bit_identical(bucket, launched_local, tmp_path):
  import random
  import signal
  import time
  from tests.test_fault_tolerance import _final_params
  params, final_step, rows = launched_local
  workdir = bucket.url()
  ckpts = storage.join(workdir, "checkpoints")
  rng = random.Random(bucket.scheme)
  half_written = []
  for i, target in enumerate((2, 9)):  # a committed step first, then mid-run again
    proc = _start_training(bucket, workdir, tmp_path / f"killed{i}")
    deadline = time.monotonic() + 300
    while (proc.poll() is None and time.monotonic() < deadline and
           max(checkpoint.committed_steps(ckpts), default=0) < target):
      time.sleep(0.1)
    time.sleep(rng.random() * 0.5)  # mid-step, mid-save, mid-upload
    assert proc.poll() is None, (tmp_path / f"killed{i}" / "stderr").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed, pending = _steps_on(ckpts)
    half_written += pending
  assert committed, "no step was committed before the kills"
  final = _launch(bucket, "launch.train", *_interrupted_flags(workdir))
  assert final.returncode == 0, final.stderr[-3000:]
  assert f"resumed from step {committed[-1]}" in final.stdout.splitlines()
  assert _rows(workdir) == rows  # every metric of every step, bit for bit
  got, step = _final_params(workdir)
  assert step == final_step == 20
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)
  print(f"{bucket.scheme}: committed at the last kill {committed}; half-written at the kills: "
        f"{half_written}")


@pytest.fixture
def gated_bucket(bucket):
  """An emulator of the test's own, of `bucket`'s scheme, that the test stops and starts again
  (tests/buckets.py: Gate)."""
  from tests.buckets import gated_emulator
  with gated_emulator(bucket.scheme) as emulator:
    yield emulator


@pytest.mark.slow  # ~2-3 min per emulator: two launcher starts, the clients' retries (~30 s each)
def test_the_store_going_away_mid_save_is_one_line_and_the_run_resumes(gated_bucket,
                                                                        launched_local, tmp_path):
  import re
  import subprocess
  import time
  store = gated_bucket
  _, _, rows = launched_local
  workdir = store.url()
  ckpts = storage.join(workdir, "checkpoints")
  proc = _start_training(store, workdir, tmp_path)
  half, deadline = None, time.monotonic() + 300
  while proc.poll() is None and time.monotonic() < deadline:
    committed, pending = _steps_on(ckpts)
    if committed and pending:  # a save under way after a complete one: the store goes away
      store.stop()
      half = pending[-1]
      break
    time.sleep(0.05)
  assert half is not None, f"no save seen in progress; {(tmp_path / 'stderr').read_text()[-3000:]}"
  gone = time.monotonic()
  try:
    proc.wait(timeout=300)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    pytest.fail("the launcher did not end within 300 s of the store going away")
  took = time.monotonic() - gone
  stderr = (tmp_path / "stderr").read_text()
  # Not the outage's: orbax's warning that saving every step waits for the save before it, and
  # TensorStore's note that it uses the emulator's test token.
  noise = ("Waiting for previous save to complete", "GOOGLE_AUTH_TOKEN_FOR_TESTING")
  lines = [line for line in stderr.splitlines()
           if line.strip() and not any(n in line for n in noise)]
  assert proc.returncode == 1 and len(lines) == 1, stderr[-5000:]
  assert re.match(r"error: cannot (save|write) ", lines[0]), lines[0]
  assert "run the same command to resume" in lines[0], lines[0]
  store.start()
  committed, _ = _steps_on(ckpts)
  assert committed and half not in committed and committed[-1] < half  # half-written: not a step
  if lines[0].startswith("error: cannot save"):
    assert f"The newest complete checkpoint is step {committed[-1]}." in lines[0], lines[0]
  again = _launch(store, "launch.train", *_interrupted_flags(workdir))
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resumed from step {committed[-1]}" in again.stdout.splitlines()
  assert _rows(workdir) == rows
  print(f"{store.scheme}: the store went away during the save of step {half}; the launcher ended "
        f"{took:.0f} s later: {lines[0]}")
