"""Problems found late lose no trained steps: start-up checks before step 1, a save of the last
finished step when an error ends the run, and SIGTERM honoured during evaluation and sampling."""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from ftjax import checkpoint, configs, loop, metrics
from ftjax.data import prepared
from ftjax.errors import CorpusError
from ftjax.trainer import Trainer
from tests.conftest import resolved

TIMING = ("tokens_per_sec", "mfu")
# Host-side settings of the tiny config only: every run here shares one compilation.
HOST = {"train.steps": 8, "train.eval_every": 4, "train.log_every": 1, "train.num_samples": 0,
        "train.peak_flops": 1.0, "checkpoint.every_steps": 0}


def _cfg(tiny_cfg, **overrides):
  return resolved(tiny_cfg, **{**HOST, **overrides})


def _rows(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics.read_rows(str(workdir))]


def _params(state):
  return jax.tree_util.tree_leaves(jax.device_get(state.params))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: its final parameters and metric rows."""
  from experiments import tiny
  cfg = resolved(configs.resolve(tiny.get_config()), **HOST)
  workdir = tmp_path_factory.mktemp("reference")
  state = loop.train_and_evaluate(cfg, str(workdir), log=lambda *_: None)
  return _params(state), _rows(workdir)


def _same_run(state, workdir, reference):
  params, rows = reference
  for a, b in zip(_params(state), params):
    np.testing.assert_array_equal(a, b)
  assert _rows(workdir) == rows


def _failing(trainer, name, error, calls=1):
  """Makes `trainer.<name>` raise `error` on its `calls`-th call."""
  original, count = getattr(trainer, name), [0]

  def wrapped(*args, **kwargs):
    count[0] += 1
    if count[0] == calls:
      raise error
    return original(*args, **kwargs)
  setattr(trainer, name, wrapped)


# ------------------------------------------------------------------------ checks before step 1

def _prepared(tmp_path, docs=300):
  (tmp_path / "corpus.txt").write_text("\n".join(f"line {i} of the corpus" for i in range(docs)))
  settings = prepared.Settings(inputs=(str(tmp_path / "corpus.txt"),), tokenizer="bytes",
                               text_unit="line", docs_per_shard=100)
  prepared.prepare(settings, str(tmp_path / "data"))
  return {"data.name": "prepared", "data.path": str(tmp_path / "data"), "data.tokenizer": "auto",
          "model.vocab_size": 320}


def _uncompilable(cfg):
  """A trainer whose init and train step fail the test if anything reaches them."""
  trainer = Trainer.create(cfg)

  def compiled(*_):
    raise AssertionError("compiled before the start-up checks")
  trainer.init_state = trainer.train_step = compiled
  return trainer


def test_an_eval_larger_than_the_validation_split_fails_before_compiling(tiny_cfg, tmp_path):
  cfg = _cfg(tiny_cfg, **_prepared(tmp_path), **{"train.eval_batches": 100000})
  with pytest.raises(configs.ConfigError, match=r"train.eval_batches: 100000 batches .* use at "
                                                r"most 1$"):
    loop.train_and_evaluate(cfg, str(tmp_path / "run"), trainer=_uncompilable(cfg))
  assert not (tmp_path / "run" / "checkpoints").exists() or \
      not os.listdir(tmp_path / "run" / "checkpoints")


def test_an_unreadable_validation_split_fails_before_compiling(tiny_cfg, tmp_path):
  cfg = _cfg(tiny_cfg, **_prepared(tmp_path), **{"train.eval_batches": 1})
  trainer = _uncompilable(cfg)
  for name in os.listdir(tmp_path / "data"):
    if name.startswith("validation-"):
      os.remove(tmp_path / "data" / name)
  with pytest.raises(CorpusError, match="the validation split"):
    loop.train_and_evaluate(cfg, str(tmp_path / "run"), trainer=trainer)


def test_prompts_that_fill_the_training_length_fail_before_compiling(tiny_cfg, tmp_path):
  cfg = _cfg(tiny_cfg, **_prepared(tmp_path), **{"train.eval_batches": 1,
                                                 "train.num_samples": 2, "model.seq_len": 16})
  with pytest.raises(configs.ConfigError, match="train.num_samples: the sample prompts hold 16"):
    loop.train_and_evaluate(cfg, str(tmp_path / "run"), trainer=_uncompilable(cfg))


# ----------------------------------------------------------- an error after progress saves it

def test_an_error_at_eval_time_saves_the_step_and_the_run_resumes_bit_identically(
    tiny_cfg, tmp_path, reference):
  cfg = _cfg(tiny_cfg)
  trainer = Trainer.create(cfg, run_dir=str(tmp_path))
  _failing(trainer, "evaluate", CorpusError("the validation shard went away"), calls=2)
  with pytest.raises(CorpusError) as error:  # the eval at step 8, after the one at step 4
    loop.train_and_evaluate(cfg, str(tmp_path), log=lambda *_: None, trainer=trainer)
  assert error.value.__notes__ == ["step 8 is saved: run the same command to resume from it"]
  assert checkpoint.Manager(tmp_path / "checkpoints", read_only=True).all_steps() == [8]
  state = loop.train_and_evaluate(cfg, str(tmp_path), log=lambda *_: None)
  _same_run(state, tmp_path, reference)  # the step-8 eval is made on resuming


def test_an_error_while_sampling_keeps_the_step_and_the_run_continues(
    tiny_cfg, tmp_path, reference, monkeypatch):
  cfg = _cfg(tiny_cfg)
  lines = []

  def broken(*_):
    raise RuntimeError("sampling broke")
  monkeypatch.setattr(loop, "show_samples", broken)
  with pytest.raises(RuntimeError, match="sampling broke") as error:
    loop.train_and_evaluate(_cfg(tiny_cfg, **{"train.num_samples": 2}), str(tmp_path),
                            log=lines.append, stop_at=4)
  assert error.value.__notes__ == ["step 4 is saved: run the same command to resume (it samples "
                                   "again)"]
  monkeypatch.undo()
  state = loop.train_and_evaluate(cfg, str(tmp_path), log=lambda *_: None)
  _same_run(state, tmp_path, reference)


def test_a_failed_save_is_not_retried(tiny_cfg, tmp_path):
  cfg = _cfg(tiny_cfg)
  trainer = Trainer.create(cfg, run_dir=str(tmp_path))
  _failing(trainer, "evaluate", checkpoint.SaveError("the disk is gone"))
  with pytest.raises(checkpoint.SaveError) as error:
    loop.train_and_evaluate(cfg, str(tmp_path), log=lambda *_: None, trainer=trainer)
  assert not getattr(error.value, "__notes__", None)


# -------------------------------------------------------------- SIGTERM wherever the loop is

def _signal_on_call(trainer, name, calls):
  """`trainer.<name>` sends this process SIGTERM on its `calls`-th call, then carries on."""
  original, count = getattr(trainer, name), [0]

  def wrapped(*args, **kwargs):
    count[0] += 1
    if count[0] == calls:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)
  setattr(trainer, name, wrapped)


def test_sigterm_during_an_evaluation_saves_and_the_resumed_run_evaluates(
    tiny_cfg, tmp_path, reference):
  long_eval = _cfg(tiny_cfg, **{"train.eval_batches": 100000})
  trainer = Trainer.create(long_eval, run_dir=str(tmp_path))
  _signal_on_call(trainer, "eval_step", calls=3)  # the third batch of the step-4 evaluation
  lines, start = [], time.monotonic()
  state = loop.train_and_evaluate(long_eval, str(tmp_path), log=lines.append, trainer=trainer)
  assert time.monotonic() - start < 120  # 100000 batches would take far longer
  assert int(state.step) == 4 and "stopped by a signal at step 4" in lines[-1]
  assert checkpoint.Manager(tmp_path / "checkpoints", read_only=True).all_steps() == [4]
  assert not any("eval_ce" in r for r in _rows(tmp_path))
  state = loop.train_and_evaluate(_cfg(tiny_cfg), str(tmp_path), log=lambda *_: None)
  _same_run(state, tmp_path, reference)


def test_sigterm_while_sampling_ends_the_run_with_its_checkpoint(tiny_cfg, tmp_path, monkeypatch):
  def slow_samples(*_):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)  # the signal ends this at once
    raise AssertionError("the signal did not stop sampling")
  monkeypatch.setattr(loop, "show_samples", slow_samples)
  lines, start = [], time.monotonic()
  state = loop.train_and_evaluate(_cfg(tiny_cfg, **{"train.num_samples": 2}), str(tmp_path),
                                  log=lines.append, stop_at=4)
  assert time.monotonic() - start < 60
  assert int(state.step) == 4 and "stopped by a signal while sampling after step 4" in lines[-1]
  assert checkpoint.Manager(tmp_path / "checkpoints", read_only=True).all_steps() == [4]
  with open(tmp_path / "metrics.jsonl") as f:
    assert all(json.loads(line)["step"] <= 4 for line in f)
