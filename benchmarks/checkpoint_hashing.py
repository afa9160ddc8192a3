"""Save-to-verified time of a checkpoint with several processes: each process hashing the files
it wrote (ftjax now) against process 0 hashing every file before the commit (before).

  python -m benchmarks.checkpoint_hashing [--mb=512] [--processes=2] [--repeats=3] [--workdir=DIR]

Starts --processes processes on localhost (CPU, one device each, jax.distributed, as the
multi-process tests do) once per mode. Each saves a state of --mb MB of random float32 arrays
sharded over all devices through `checkpoint.Manager`: one untimed save, then --repeats timed
ones, each from the `save` call until `wait` returns on process 0, i.e. until the step's manifest
is written and the step committed. 'process 0 hashes all' replays the previous behaviour: no
process hands in entries, so process 0 hashes every file in `_before_commit`, as it did. The
files are hashed from the page cache (just written), on the disk of --workdir.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_MB = flags.DEFINE_integer("mb", 512, "Size of the saved state, MiB (all processes together).")
_PROCESSES = flags.DEFINE_integer("processes", 2, "Processes (one CPU device each).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed saves per mode (after one untimed save).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to save (default: a temporary directory).")
_WORKER = flags.DEFINE_enum("worker", None, ["per_process", "process_0"], "Internal: run one "
                            "process of a mode.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Internal.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Internal.")

MODES = {"per_process": "each process hashes its own files", "process_0": "process 0 hashes all"}
_ARRAYS = 8  # the state: this many arrays of --mb / 8 MB each


def _state(mb):
  import jax
  import numpy as np
  mesh = jax.make_mesh((jax.device_count(),), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  rows = (mb << 20) // (_ARRAYS * 4 * 1024) // jax.device_count() * jax.device_count()

  def array(k):
    return jax.make_array_from_callback(
        (rows, 1024), sharding, lambda idx: np.random.default_rng((k, idx[0].start or 0))
        .standard_normal((len(range(rows)[idx[0]]), 1024), np.float32))

  return {f"w{k}": array(k) for k in range(_ARRAYS)}


def worker(mode):
  """One process of a mode: the timed saves; process 0 prints them as a JSON line."""
  import jax
  from ftjax import checkpoint, distributed
  from ftjax.configs import default_config
  distributed.initialize(_COORDINATOR.value, _PROCESSES.value, _PROCESS_ID.value)
  if mode == "process_0":
    checkpoint._own_files = lambda item_dir: []  # no entries handed in: process 0 hashes all
  before_commit, commit_times = checkpoint.Manager._before_commit, []

  def timed_before_commit(manager):  # process 0, between the processes' barrier and the commit
    start = time.perf_counter()
    before_commit(manager)
    commit_times.append(time.perf_counter() - start)

  checkpoint.Manager._before_commit = timed_before_commit
  state = jax.block_until_ready(_state(_MB.value))
  cfg = default_config()
  cfg.checkpoint.keep = _REPEATS.value + 1
  manager = checkpoint.Manager(os.path.join(_WORKDIR.value, "checkpoints"), cfg,
                               log=lambda *_: None)
  times = []
  for step in range(_REPEATS.value + 1):
    start = time.perf_counter()
    manager.save(step, state, {"step": step})
    manager.wait()
    times.append(time.perf_counter() - start)
  manager.close()
  if jax.process_index() == 0:
    step_dir = os.path.join(_WORKDIR.value, "checkpoints", str(_REPEATS.value))
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(step_dir)
               for f in files)
    print(json.dumps({"times": times[1:], "before_commit": commit_times[1:], "bytes": size}),
          flush=True)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_mode(mode, workdir):
  """Starts the processes of one mode; process 0's JSON result."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "benchmarks.checkpoint_hashing", f"--worker={mode}",
       f"--coordinator_address=127.0.0.1:{port}", f"--process_id={i}",
       f"--processes={_PROCESSES.value}", f"--mb={_MB.value}", f"--repeats={_REPEATS.value}",
       f"--workdir={workdir}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(_PROCESSES.value)]
  outs = [p.communicate() for p in procs]
  for p, (_, err) in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(f"a {mode} process failed:\n{err[-3000:]}")
  return json.loads(outs[0][0].strip().splitlines()[-1])


def _median_range(xs):
  xs = sorted(x * 1e3 for x in xs)
  return f"{xs[len(xs) // 2]:.0f} ({xs[0]:.0f}–{xs[-1]:.0f})"


def main(argv):
  del argv
  if _WORKER.value:
    worker(_WORKER.value)
    return
  from benchmarks import common
  rows, medians = [], {}
  for mode in ("process_0", "per_process"):
    workdir = tempfile.mkdtemp(dir=_WORKDIR.value)
    try:
      result = run_mode(mode, workdir)
    finally:
      shutil.rmtree(workdir, ignore_errors=True)
    times = result["times"]
    medians[mode] = sorted(times)[len(times) // 2]
    rows.append([MODES[mode], f"{result['bytes'] / 1e6:.0f}", _median_range(times),
                 _median_range(result["before_commit"]),
                 f"{result['bytes'] / medians[mode] / 1e6:.0f}",
                 f"{medians['process_0'] / medians[mode]:.2f}"])
    print(rows[-1], flush=True)
  common.record(
      f"Checkpoint save to verified: {_PROCESSES.value} processes, per-process hashing",
      common.markdown_table(["hashing", "step MB", "save to verified, ms (median, min–max)",
                             "of which process 0 before the commit, ms", "MB/s", "speed-up"],
                            rows),
      f"{_PROCESSES.value} processes on localhost (CPU, one device each, jax.distributed), a "
      f"state of {_ARRAYS} random float32 arrays, {_MB.value} MB in all, sharded over their "
      f"devices; one untimed save, then {_REPEATS.value} timed, from `Manager.save` until "
      f"`wait` returns on process 0 (the step's manifest written and the step committed); "
      f"'before the commit': process 0's `_before_commit` (the entries gathered, the files left "
      f"hashed, the manifest written) while the others wait; the files hashed from the page "
      f"cache. 'process 0 hashes all' replays the behaviour "
      f"before per-process hashing (process 0 hashes every file before the commit).")


if __name__ == "__main__":
  app.run(main)
