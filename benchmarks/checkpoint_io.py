"""How long a checkpoint save blocks the training loop (async orbax), how big it is, and how
long a restore takes (the train state, or the parameters only).

  python -m benchmarks.checkpoint_io [--configs=synthetic,shakespeare] [--repeats=3]

Times `Manager.save` (the call the loop waits for; the write continues in the background) and
the full save (until the files are committed: since checkpoints carry checksums this includes
hashing every file in the background), and verifying a step's checksums as a restore does,
on the config's real train state. Then the hashing alone: `integrity.write_checksums` on one
file of --hash_mb MB (in the page cache, so it measures hashing, not the disk) with each thread
count of --hash_threads (files over 64 MiB are hashed by segments in parallel).

  python -m benchmarks.checkpoint_io --configs= --hash_threads=1,2 --hash_mb=512
"""

import os
import shutil
import tempfile
import time

import jax
from absl import app, flags

from benchmarks import common
from ftjax import checkpoint, integrity, metrics
from ftjax.trainer import Trainer
from ftjax.configs import resolve

_CONFIGS = flags.DEFINE_list("configs", ["synthetic", "shakespeare"], "Experiment configs.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Saves per config.")
_HASH_THREADS = flags.DEFINE_list("hash_threads", [], "Thread counts for the hashing table.")
_HASH_MB = flags.DEFINE_integer("hash_mb", 512, "Size of the file the hashing table hashes.")


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


def _median_range(xs, scale=1.0):
  xs = sorted(x * scale for x in xs)
  return f"{xs[len(xs) // 2]:.0f} ({xs[0]:.0f}–{xs[-1]:.0f})"


def hashing_table():
  """write_checksums on one --hash_mb file with each --hash_threads count."""
  step_dir = tempfile.mkdtemp()
  size = _HASH_MB.value << 20
  with open(os.path.join(step_dir, "data"), "wb") as f:
    for _ in range(_HASH_MB.value):
      f.write(os.urandom(1 << 20))
  integrity.write_checksums(step_dir)  # warm the page cache
  rows, base = [], None
  for threads in map(int, _HASH_THREADS.value):
    integrity.HASH_THREADS = threads
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      integrity.write_checksums(step_dir)
      times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    base = base or median
    rows.append([threads, _median_range(times, 1e3), f"{size / median / 1e6:.0f}",
                 f"{base / median:.2f}"])
    print(rows[-1], flush=True)
  shutil.rmtree(step_dir)
  common.record("Checkpoint hashing: threads", common.markdown_table(
      ["threads", "write_checksums, ms (median, min–max)", "MB/s", "speed-up"], rows),
      f"One {_HASH_MB.value} MB file of random bytes in the page cache, hashed by 64 MiB "
      f"segments; {_REPEATS.value} repeats per thread count, same run.")


def main(argv):
  del argv
  if _HASH_THREADS.value:
    hashing_table()
  saves_table()


def saves_table():
  import importlib
  rows = []
  for name in _CONFIGS.value:
    cfg = resolve(importlib.import_module(f"experiments.{name}").get_config())
    trainer = Trainer.create(cfg)
    state = trainer.init_state()
    for step in range(2):  # a trained state: moments and post-sampler rows no longer all zero
      state, _ = trainer.train_step(state, trainer.batch(step))
    state = jax.block_until_ready(state)
    blocking, total, verify, restore, params_only, size = [], [], [], [], [], 0
    abstract = trainer.abstract_state()
    for i in range(_REPEATS.value):
      workdir = tempfile.mkdtemp()
      manager = checkpoint.Manager(os.path.join(workdir, "checkpoints"), cfg, log=lambda *_: None)
      start = time.perf_counter()
      manager.save(i + 1, state, {"step": 2})
      blocking.append(time.perf_counter() - start)
      manager.wait()
      total.append(time.perf_counter() - start)
      size = _dir_bytes(os.path.join(workdir, "checkpoints", str(i + 1)))
      start = time.perf_counter()
      integrity.verify_files(os.path.join(workdir, "checkpoints", str(i + 1)))
      verify.append(time.perf_counter() - start)
      manager.close()
      reader = checkpoint.Manager(os.path.join(workdir, "checkpoints"), read_only=True)
      reader.verify = False  # timed above: this is reading the arrays onto the device
      for wanted, times in ((abstract, restore),
                            (checkpoint.without_optimizer(abstract), params_only)):
        start = time.perf_counter()
        jax.block_until_ready(reader.restore(i + 1, wanted)[0])
        times.append(time.perf_counter() - start)
      reader.close()
      shutil.rmtree(workdir)
    rows.append([name, f"{metrics.count_params(state.params):,}", f"{size / 1e6:.1f}",
                 _median_range(blocking, 1e3), _median_range(total, 1e3),
                 _median_range(verify, 1e3),
                 f"{size / sorted(verify)[len(verify) // 2] / 1e6:.0f}",
                 _median_range(restore, 1e3), _median_range(params_only, 1e3)])
    print(rows[-1], flush=True)
  if not rows:
    return
  table = common.markdown_table(["config", "parameters", "checkpoint MB",
                                 "save blocks the loop, ms (median, min–max)",
                                 "save complete, ms", "verify on restore, ms",
                                 "verify MB/s", "restore train state, ms",
                                 "restore parameters only, ms"], rows)
  common.record("Checkpoint save: time the loop is blocked (async) and size", table,
                f"Train state after 2 steps = parameters + AdamW moments (fp32) + counters; orbax "
                f"compresses the untouched (zero) rows of the post-sampler; "
                f"{_REPEATS.value} saves per config to a fresh directory on local disk. Saves write "
                f"SHA-256 checksums of every file before the commit (in orbax's background "
                f"thread); 'verify' re-reads and hashes a committed step as a restore does "
                f"(checkpoint.verify=True). 'restore' reads a step onto the device without verifying it: "
                f"the whole train state (resuming) or, as `load_run` does for sampling, "
                f"evaluation and export, the parameters without the optimizer state.")


if __name__ == "__main__":
  app.run(main)
