"""Checkpoint save, restore and verify on local disk against the emulated buckets, same run.

  python -m benchmarks.checkpoint_stores --stores=local,gs,s3 --repeats=5 --mb=256

The same train state is saved, restored and verified through `ftjax.checkpoint.Manager` (orbax +
TensorStore + the checksum manifest), the real code path, in (a) a local temporary directory,
(b) a fake GCS server and (c) moto's S3 server (tests/buckets.py's emulators, which need the
test extras of requirements.txt), all in one process; the stores take turns within each round
(local, gs, s3, local, ...), after --warmup untimed rounds, so that drift of the machine falls
on all of them alike. Per store, each round in a fresh directory or bucket prefix:

  save     `Manager.save` to committed (`Manager.wait`): the arrays written, every file hashed
           (read back) into the manifest, the commit (a rename locally, orbax's commit marker
           on a bucket)
  restore  `Manager.restore` with checkpoint.verify=True: the manifest checked (every file
           re-read and hashed), then the arrays read onto the device
  verify   `integrity.verify_files` alone: the check the restore starts with

The state is --mb MiB of random float32 (incompressible; 16 MiB leaves plus a few small ones,
as a train state has), and/or the 2-step train state of each --configs experiment config:

  python -m benchmarks.checkpoint_stores --mb=0 --configs=synthetic,shakespeare

The table (median and min–max, MB/s, bucket median ÷ local median) is appended to RESULTS.md
(--no_record: printed only). By default moto runs in its own process (--s3_server=process), as
fake-gcs-server does (a Go binary); --s3_server=thread runs it in this process, as the tests do,
where it shares the GIL with the client being measured. A check at a tiny size:

  python -m benchmarks.checkpoint_stores --mb=8 --repeats=1 --warmup=0 --no_record
"""

import contextlib
import importlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from benchmarks import common
from ftjax import checkpoint, integrity, storage
from ftjax.configs import resolve

STORES = ("local", "gs", "s3")
TITLE = "Checkpoint stores: local disk against emulated buckets"

_STORES = flags.DEFINE_list("stores", list(STORES), "Where to save: any of local, gs, s3.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed save/restore/verify rounds per store.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed rounds per store before the timed ones.")
_MB = flags.DEFINE_integer("mb", 256, "Size of the random state in MiB (0: none).")
_CONFIGS = flags.DEFINE_list("configs", [], "Experiment configs whose 2-step train state is "
                             "also measured.")
_S3_SERVER = flags.DEFINE_enum("s3_server", "process", ["process", "thread"],
                               "moto's S3 server: its own process, or a thread of this one "
                               "(as the tests run it).")
_NO_RECORD = flags.DEFINE_bool("no_record", False, "Print the table; leave RESULTS.md alone.")

_LEAF = 4 << 20  # float32 elements of a big leaf: 16 MiB


def _quiet(*_):
  pass


def random_state(mb):
  """(config, state, abstract state) of `mb` MiB of random float32: 16 MiB leaves, the rest in
  one leaf, and a few small leaves and a step counter as a train state has."""
  cfg = resolve(importlib.import_module("experiments.tiny").get_config())  # the manager's
  rng = np.random.default_rng(0)
  total = (mb << 20) // 4
  sizes = [_LEAF] * (total // _LEAF) + ([total % _LEAF] if total % _LEAF else [])
  device = jax.devices()[0]
  state = {"params": {f"w{i:03d}": jax.device_put(rng.standard_normal(n, np.float32), device)
                      for i, n in enumerate(sizes)},
           "norms": {f"n{i}": jax.device_put(rng.standard_normal(256, np.float32), device)
                     for i in range(8)},
           "step": jax.device_put(np.int32(2), device)}
  sharding = jax.sharding.SingleDeviceSharding(device)
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)
  return cfg, jax.block_until_ready(state), abstract


def config_state(name):
  """(config, state, abstract state) of an experiment config after 2 train steps (as
  benchmarks/checkpoint_io.py: moments and post-sampler rows no longer all zero)."""
  from ftjax.trainer import Trainer
  cfg = resolve(importlib.import_module(f"experiments.{name}").get_config())
  trainer = Trainer.create(cfg)
  state = trainer.init_state()
  for step in range(2):
    state, _ = trainer.train_step(state, trainer.batch(step))
  return cfg, jax.block_until_ready(state), trainer.abstract_state()


@contextlib.contextmanager
def s3_process_emulator():
  """tests/buckets.py's S3 emulator, with moto's server in a process of its own."""
  from tests import buckets
  import boto3
  import s3fs
  port = buckets._free_port()
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    buckets._wait_for(f"{url}/", server)
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    with buckets._environment(env):
      s3fs.S3FileSystem.clear_instance_cache()
      boto3.client("s3", endpoint_url=url).create_bucket(Bucket=buckets.BUCKET)
      yield buckets.Emulator("s3", env)
  finally:
    server.terminate()
    server.wait(timeout=10)


def _emulator(store):
  from tests import buckets
  if store == "gs":
    return buckets.gcs_emulator()
  if _S3_SERVER.value == "thread":
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    return buckets.s3_emulator()
  return s3_process_emulator()


class Store:
  """Where checkpoints go: fresh directories under a local temporary directory, or fresh
  prefixes of an emulator's bucket; each removed after its round."""

  def __init__(self, name, emulator=None):
    self.name, self._emulator = name, emulator
    self._local = None if emulator else tempfile.mkdtemp(prefix="ftjax_stores_")

  def fresh(self):
    if self._emulator is None:
      return os.path.join(tempfile.mkdtemp(dir=self._local), "checkpoints")
    return storage.join(self._emulator.url(), "checkpoints")

  def remove(self, directory):
    if self._emulator is None:
      shutil.rmtree(os.path.dirname(directory))
    else:
      storage.remove_tree(os.path.dirname(directory))

  def close(self):
    if self._local:
      shutil.rmtree(self._local, ignore_errors=True)


def one_round(store, cfg, state, abstract, check):
  """(save s, restore s, verify s, checkpoint bytes) of one save into a fresh directory."""
  directory = store.fresh()
  manager = checkpoint.Manager(directory, cfg, log=_quiet)
  start = time.perf_counter()
  manager.save(1, state, {"step": 2})
  manager.wait()
  save = time.perf_counter() - start
  manager.close()
  step_dir = storage.join(directory, "1")
  files = integrity.read_checked(storage.join(step_dir, integrity.CHECKSUMS))["files"]
  size = sum(entry[0] or 0 for entry in files.values())
  reader = checkpoint.Manager(directory, read_only=True, log=_quiet)
  reader.verify = True
  start = time.perf_counter()
  restored = jax.block_until_ready(reader.restore(1, abstract)[0])
  restore = time.perf_counter() - start
  reader.close()
  start = time.perf_counter()
  integrity.verify_files(step_dir)
  verify = time.perf_counter() - start
  if check:  # once per store: the bytes came back
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
      if not np.array_equal(np.asarray(a), np.asarray(b)):
        raise AssertionError(f"{store.name}: the restored state differs from the saved one")
  del restored
  store.remove(directory)
  return save, restore, verify, size


def _median(xs):
  return statistics.median(xs)


def _rate(mb, seconds):
  rate = mb / seconds
  return f"{rate:.1f}" if rate < 10 else f"{rate:.0f}"


def _ms(xs):
  xs = sorted(x * 1e3 for x in xs)
  return f"{_median(xs):.0f} ({xs[0]:.0f}–{xs[-1]:.0f})"


def measure(label, cfg, state, abstract, stores):
  """The table's rows for one state: each store's times, MB/s and ratios to local disk."""
  times = {s.name: ([], [], []) for s in stores}  # save, restore, verify
  size = {}
  for r in range(_WARMUP.value + _REPEATS.value):
    for store in stores:
      save, restore, verify, size[store.name] = one_round(store, cfg, state, abstract,
                                                          check=r == 0)
      if r >= _WARMUP.value:
        for xs, x in zip(times[store.name], (save, restore, verify)):
          xs.append(x)
      print(f"{label} {store.name} round {r}{' (warm-up)' if r < _WARMUP.value else ''}: "
            f"save {save * 1e3:.0f} ms, restore {restore * 1e3:.0f} ms, "
            f"verify {verify * 1e3:.0f} ms", flush=True)
  local = times.get("local")
  rows = []
  for store in stores:
    mb = size[store.name] / 1e6
    row = [label, store.name, f"{mb:.1f}"]
    for xs in times[store.name]:
      row += [_ms(xs), _rate(mb, _median(xs))]
    row += [f"{_median(xs) / _median(base):.2f}" if local else "–"
            for xs, base in zip(times[store.name], local or times[store.name])]
    rows.append(row)
  return rows


def _start(stack, name):
  if name == "local":
    return Store(name)
  try:
    return Store(name, stack.enter_context(_emulator(name)))
  except (KeyboardInterrupt, SystemExit):
    raise
  except BaseException as e:  # noqa: BLE001 (pytest.importorskip's Skipped is a BaseException)
    raise app.UsageError(f"cannot start the {name} emulator: {e}") from None


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax logs several INFO lines per save and restore
    absl_logging.set_verbosity(absl_logging.WARNING)
  names = [s.strip() for s in _STORES.value if s.strip()]
  unknown = sorted(set(names) - set(STORES))
  if unknown or not names or len(set(names)) != len(names):
    raise app.UsageError(f"--stores={','.join(_STORES.value)}: give each of "
                         f"{','.join(STORES)} at most once")
  if _MB.value <= 0 and not _CONFIGS.value:
    raise app.UsageError("nothing to save: give --mb > 0 or --configs")
  if _REPEATS.value < 1:
    raise app.UsageError("--repeats must be at least 1")
  states = [(f"random {_MB.value} MiB", lambda: random_state(_MB.value))] if _MB.value > 0 else []
  states += [(name, lambda name=name: config_state(name)) for name in _CONFIGS.value]
  rows = []
  with contextlib.ExitStack() as stack:
    stores = []
    for name in names:
      stores.append(_start(stack, name))
      stack.callback(stores[-1].close)
    for label, make in states:
      cfg, state, abstract = make()
      rows += measure(label, cfg, state, abstract, stores)
      del state
  table = common.markdown_table(
      ["state", "store", "checkpoint MB", "save, ms (median, min–max)", "save MB/s",
       "restore (verified), ms", "restore MB/s", "verify, ms", "verify MB/s",
       "save ÷ local", "restore ÷ local", "verify ÷ local"], rows)
  emulators = []
  if "gs" in names:
    emulators.append("fake-gcs-server (Go; filesystem backend on the same disk as the local "
                     "directory)")
  if "s3" in names:
    emulators.append("moto's S3 server (Python; objects in memory, large ones spooled to "
                     "temporary files; " + ("in a process of its own)"
                                            if _S3_SERVER.value == "process" else
                                            "in a thread of the benchmark's own process, "
                                            "sharing its GIL)"))
  rounds = f"{_REPEATS.value} timed round{'s' if _REPEATS.value != 1 else ''}"
  notes = (
      f"One process, the same state saved to each store: {rounds} per store after "
      f"{_WARMUP.value} untimed, the stores in turn within each round, each round a fresh "
      f"directory or bucket prefix. 'save': `Manager.save` to committed (the arrays, the "
      f"SHA-256 manifest of every file read back, the commit: a rename locally, orbax's marker "
      f"on a bucket); 'restore': `Manager.restore` with checkpoint.verify=True (the manifest "
      f"check, then the arrays onto the device); 'verify': `integrity.verify_files` alone. "
      f"'÷ local': the store's median over local disk's (above 1: slower).")
  if emulators:
    notes += (
        f" The emulators are not clouds: {' and '.join(emulators)} "
        f"{'run' if len(emulators) > 1 else 'runs'} on this host and "
        f"{'are' if len(emulators) > 1 else 'is'} reached over loopback HTTP, so the ratios "
        f"measure the client path (HTTP, TensorStore's gcs and s3 drivers, fsspec's gcsfs and "
        f"s3fs for the manifest and its verification) plus the emulators' own cost, not a "
        f"cloud store's bandwidth or latency.")
  results = common.RESULTS
  if _NO_RECORD.value:
    common.RESULTS = os.devnull  # record() still prints the block
  try:
    common.record(TITLE, table, notes)
  finally:
    common.RESULTS = results


if __name__ == "__main__":
  app.run(main)
