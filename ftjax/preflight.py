"""Checks made before step 1: what can fail later in a run and is knowable at its start.

`check_before_training` builds the evaluation stream and draws one batch, checks the eval
settings against the validation split, builds and decodes the sample prompts, checks that the
trackers named and the end-of-run hook can be imported and that every output directory of the
run can be written. A problem raises `CorpusError` or `ConfigError` (one line; the launcher exits
2) before anything is compiled. What can only fail later, and why, is listed in
docs/architecture.md ("Start-up checks").
"""

import math
import os

import jax
import numpy as np

from ftjax import configs, metrics as metrics_lib, storage, trackers
from ftjax.errors import ConfigError, CorpusError


def check_before_training(trainer, workdir: str) -> None:
  """Raises CorpusError / ConfigError / WriteError for a problem the run would meet later."""
  trackers.require_installed(trainer.cfg)
  configs.end_of_run_hook(trainer.cfg.train)  # or ConfigError
  for name in _output_dirs(trainer.cfg):
    check_writable(os.path.join(workdir, name))
  _check_eval_stream(trainer)
  _check_eval_size(trainer)
  if trainer.cfg.train.num_samples:
    _check_prompts(trainer)


def _output_dirs(cfg) -> list:
  """The run's directories that this config writes to."""
  from ftjax import run  # orbax is heavy to import; only the loop needs it
  named = configs.tracker_names(cfg.train)
  return ([run.CHECKPOINTS_DIR] + [run.TB_DIR] * ("tensorboard" in named) +
          [run.WANDB_DIR] * ("wandb" in named) +
          [run.PROFILE_DIR] * bool(configs.profile_steps(cfg.train)))


def check_writable(directory: str) -> None:
  """WriteError (one line) unless this process can create files in `directory`."""
  probe = os.path.join(directory, f".write_test.process{jax.process_index()}")
  try:
    storage.makedirs(directory)
    storage.write_bytes(probe, b"ok")
    storage.remove(probe)
  except OSError as e:
    raise metrics_lib.write_error(directory, e) from None


def _check_eval_stream(trainer) -> None:
  """The validation split yields a batch of the shapes the eval step takes."""
  try:
    stream = trainer.stream("validation")
    try:
      batch = next(stream)
    finally:
      stream.close()
  except CorpusError as e:
    raise CorpusError(f"the validation split: {e}") from None
  except StopIteration:
    raise CorpusError("the validation split yields no batch") from None
  if np.shape(batch["inputs"])[-1] != trainer.cfg.model.seq_len:
    raise CorpusError(f"the validation split's rows hold {np.shape(batch['inputs'])[-1]} "
                      f"tokens, the eval step takes model.seq_len={trainer.cfg.model.seq_len}")


def _check_eval_size(trainer) -> None:
  """An eval that would read a finite validation split more than once is a config error."""
  tokens = trainer.source.validation_tokens
  if not tokens:
    return
  t = trainer.cfg.train
  per_batch = t.batch_size * trainer.cfg.model.seq_len
  most = max(math.ceil(tokens / per_batch), 1)
  if t.eval_batches > most:
    raise ConfigError("train.eval_batches", f"{t.eval_batches} batches of {t.batch_size} x "
                      f"{trainer.cfg.model.seq_len} tokens would read the validation split "
                      f"({tokens:,} tokens) {t.eval_batches * per_batch / tokens:.1f} times: "
                      f"use at most {most}")


def _check_prompts(trainer) -> None:
  """The sample prompts can be built, fit the training length, and decode to text."""
  n = trainer.cfg.train.num_samples
  try:
    prompts_BP = np.asarray(trainer.source.prompts(n))
    texts = [trainer.source.decode(row) for row in prompts_BP]
  except CorpusError as e:
    raise CorpusError(f"the sample prompts: {e}") from None
  if prompts_BP.ndim != 2 or len(texts) != n:
    raise CorpusError(f"the sample prompts have shape {prompts_BP.shape}, not ({n}, length)")
  if prompts_BP.shape[1] >= trainer.cfg.model.seq_len:
    raise ConfigError("train.num_samples", f"the sample prompts hold {prompts_BP.shape[1]} "
                      f"tokens, no room to sample within model.seq_len="
                      f"{trainer.cfg.model.seq_len}")
