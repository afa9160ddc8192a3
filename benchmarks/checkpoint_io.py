"""How long a checkpoint save blocks the training loop (async orbax), and how big it is.

  python -m benchmarks.checkpoint_io [--configs=synthetic,shakespeare] [--repeats=3]

Times `Manager.save` (the call the loop waits for; the write continues in the background) and
the full save (until the files are committed: since checkpoints carry checksums this includes
hashing every file in the background), and verifying a step's checksums as a restore does,
on the config's real train state.
"""

import os
import shutil
import tempfile
import time

import jax
from absl import app, flags

from benchmarks import common
from ftjax import checkpoint, metrics
from ftjax.trainer import Trainer
from ftjax.configs import resolve

_CONFIGS = flags.DEFINE_list("configs", ["synthetic", "shakespeare"], "Experiment configs.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Saves per config.")


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


def main(argv):
  del argv
  import importlib
  rows = []
  for name in _CONFIGS.value:
    cfg = resolve(importlib.import_module(f"experiments.{name}").get_config())
    trainer = Trainer.create(cfg)
    state = trainer.init_state()
    for step in range(2):  # a trained state: moments and post-sampler rows no longer all zero
      state, _ = trainer.train_step(state, trainer.batch(step))
    state = jax.block_until_ready(state)
    blocking, total, verify, size = [], [], [], 0
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
      checkpoint.verify_files(os.path.join(workdir, "checkpoints", str(i + 1)))
      verify.append(time.perf_counter() - start)
      manager.close()
      shutil.rmtree(workdir)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    rows.append([name, f"{metrics.count_params(state.params):,}", f"{size / 1e6:.1f}",
                 f"{med(blocking) * 1e3:.0f} ({min(blocking) * 1e3:.0f}–{max(blocking) * 1e3:.0f})",
                 f"{med(total) * 1e3:.0f} ({min(total) * 1e3:.0f}–{max(total) * 1e3:.0f})",
                 f"{med(verify) * 1e3:.0f} ({min(verify) * 1e3:.0f}–{max(verify) * 1e3:.0f})",
                 f"{size / med(verify) / 1e6:.0f}"])
    print(rows[-1], flush=True)
  table = common.markdown_table(["config", "parameters", "checkpoint MB",
                                 "save blocks the loop, ms (median, min–max)",
                                 "save complete, ms", "verify on restore, ms",
                                 "verify MB/s"], rows)
  common.record("Checkpoint save: time the loop is blocked (async) and size", table,
                f"Train state after 2 steps = parameters + AdamW moments (fp32) + counters; orbax "
                f"compresses the untouched (zero) rows of the post-sampler; "
                f"{_REPEATS.value} saves per config to a fresh directory on local disk. Saves write "
                f"SHA-256 checksums of every file before the commit (in orbax's background "
                f"thread); 'verify' re-reads and hashes a committed step as a restore does "
                f"(checkpoint.verify=True).")


if __name__ == "__main__":
  app.run(main)
