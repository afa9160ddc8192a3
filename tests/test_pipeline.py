"""The tfds + grain pipeline: corpora, determinism, exact iterator resume (also with workers),
and a training run on it that resumes bit-identically."""

import json

import jax
import numpy as np
import pytest

from ftjax import loop, trainer as trainer_lib
from ftjax.data import _DocumentArrays, corpora, pipeline, text, tokenizers
from tests.conftest import resolved
from ftjax.trainer import load_run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("datasets"))
  corpora.prepare("shakespeare", path)
  return path


def _batches(data_dir, n, split="train", **kw):
  it = pipeline.batches(corpora.data_source("shakespeare", split, data_dir),
                        _DocumentArrays(tokenizers.ByteTokenizer()), seed=kw.pop("seed", 0),
                        seq_len=32, batch_size=4, **kw)
  return it, [_tokens(next(it)) for _ in range(n)]


def _tokens(batch):  # (B, T + 1): the packed rows
  return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def test_corpus_splits_and_documents(data_dir):
  train_src = corpora.data_source("shakespeare", "train", data_dir)
  val_src = corpora.data_source("shakespeare", "validation", data_dir)
  assert len(train_src) > 30_000 and 0.03 < len(val_src) / len(train_src) < 0.07
  tokens, nbytes = tokenizers.document_arrays(tokenizers.ByteTokenizer(), train_src[0]["text"])
  assert tokens[-1] == text.EOS and text.decode(tokens[:-1]) == train_src[0]["text"].decode()
  assert nbytes.sum() == len(train_src[0]["text"]) and nbytes[-1] == 0


def test_same_seed_same_batches_and_packing(data_dir):
  _, a = _batches(data_dir, 3)
  _, b = _batches(data_dir, 3)
  _, c = _batches(data_dir, 3, seed=1)
  assert all((x == y).all() for x, y in zip(a, b)) and not (a[0] == c[0]).all()
  assert a[0].shape == (4, 33) and a[0].dtype == np.int32
  assert (np.concatenate(a) == text.EOS).any()  # documents are packed with end markers


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_resumes_exactly(data_dir, workers):
  it, _ = _batches(data_dir, 5, worker_count=workers)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed, _ = _batches(data_dir, 0, worker_count=workers)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert sorted(got) == sorted(pipeline.BATCH_KEYS)
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(got[key], want[key])


def test_processes_read_different_documents(data_dir):
  _, p0 = _batches(data_dir, 1, shard_index=0, shard_count=2)
  _, p1 = _batches(data_dir, 1, shard_index=1, shard_count=2)
  assert not (p0[0] == p1[0]).all()


def test_unknown_corpus_is_a_clear_error(data_dir):
  with pytest.raises(text.CorpusError, match="unknown corpus 'nope'"):
    corpora.data_source("nope", "train", data_dir)


def test_training_on_the_pipeline_resumes_bit_identically(tiny_cfg, data_dir, tmp_path):
  cfg = resolved(tiny_cfg, **{
      "data.name": "shakespeare", "data.loader": "grain", "data.data_dir": data_dir,
      "model.vocab_size": 264, "model.seq_len": 32, "train.steps": 8, "train.eval_every": 8,
      "train.log_every": 1, "train.num_samples": 0, "train.peak_flops": 1.0})
  quiet = lambda *_: None
  full = loop.train_and_evaluate(cfg, str(tmp_path / "full"), log=quiet)
  loop.train_and_evaluate(cfg, str(tmp_path / "resumed"), log=quiet, stop_at=3)
  resumed = loop.train_and_evaluate(cfg, str(tmp_path / "resumed"), log=quiet)
  jax.tree_util.tree_map(np.testing.assert_array_equal, full.params, resumed.params)
  def train_rows(workdir):  # every training metric of every step, timings aside
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")}
            for r in rows if "loss" in r]
  assert len(train_rows(tmp_path / "full")) == 8
  assert train_rows(tmp_path / "full") == train_rows(tmp_path / "resumed")
  out = trainer_lib.Trainer.create(cfg).evaluate(full.params)
  assert out["eval_bpb"] > 0 and "eval_elbo_bpb" in out


@pytest.mark.slow  # trains a sentencepiece model and a run; test_prepared covers run tokenizers
def test_sentencepiece_run_saves_and_restores_its_tokenizer(tiny_cfg, data_dir, tmp_path):
  from ftjax.data import tokenizers
  cfg = resolved(tiny_cfg, **{
      "data.name": "shakespeare", "data.loader": "grain", "data.data_dir": data_dir,
      "data.tokenizer": "sentencepiece", "data.sentencepiece_vocab": 512,
      "model.vocab_size": 512, "model.seq_len": 32, "train.steps": 2, "train.eval_every": 2,
      "train.num_samples": 0, "train.peak_flops": 1.0})
  loop.train_and_evaluate(cfg, str(tmp_path), log=lambda *_: None)
  saved = tmp_path / tokenizers.RUN_FILE
  assert saved.exists()
  tok = tokenizers.SentencePieceTokenizer(str(saved))
  line = "To be, or not to be: that is the question."
  assert tok.vocab_size == 512 and tok.decode(tok.encode(line)) == line
  assert len(tok.encode(line)) < len(line)  # subwords, not bytes
  trainer, _ = load_run(str(tmp_path))
  assert trainer.source.tokenizer.path == str(saved)
  assert 1.5 < trainer.source.bytes_per_token < 6
