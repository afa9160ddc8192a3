"""Tokenizers for text corpora: bytes, or a sentencepiece model trained on the corpus.

Both reserve ids 0, 1, 2 for padding, BOS and end of document (`ftjax.data.text`). A
sentencepiece model is trained once per (corpus, vocabulary size) into the data directory (about
ten seconds for Shakespeare) and copied into each run directory, so that sampling from the run
restores exactly the tokenizer it was trained with.
"""

import io
import os
import shutil

import numpy as np

from ftjax.data import text

RUN_FILE = "tokenizer.model"


class ByteTokenizer:
  name = "bytes"
  vocab_size = text.VOCAB_SIZE

  def encode(self, string):
    return text.encode(string)

  def decode(self, tokens):
    return text.decode(tokens)


class SentencePieceTokenizer:
  name = "sentencepiece"

  def __init__(self, path):
    import sentencepiece as spm
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.vocab_size()

  def encode(self, string):
    return np.asarray(self._sp.encode(string), np.int32)

  def decode(self, tokens):
    ids = [int(t) for t in np.asarray(tokens).tolist() if text.EOS < t < self.vocab_size]
    return self._sp.decode(ids)


def train_sentencepiece(documents, vocab_size, path, max_documents=20_000):
  """Trains a unigram model on `documents` (strings) with ftjax's special ids; writes `path`."""
  import sentencepiece as spm
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(documents), model_writer=proto, vocab_size=vocab_size,
      model_type="unigram", pad_id=text.PAD, bos_id=text.BOS, eos_id=text.EOS, unk_id=3,
      byte_fallback=True, input_sentence_size=max_documents, shuffle_input_sentence=True,
      minloglevel=2)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    f.write(proto.getvalue())
  os.replace(path + ".tmp", path)


def make_tokenizer(cfg, run_dir=None):
  """The tokenizer of `cfg.data`; a run's own copy (in `run_dir`) wins over the data directory."""
  d = cfg.data
  if d.tokenizer == "bytes":
    return ByteTokenizer()
  if run_dir and os.path.exists(os.path.join(run_dir, RUN_FILE)):
    return SentencePieceTokenizer(os.path.join(run_dir, RUN_FILE))
  from ftjax.data import corpora
  path = os.path.join(corpora.data_dir(d.data_dir), f"{d.name}_spm{d.sentencepiece_vocab}.model")
  if not os.path.exists(path):
    source = corpora.data_source(d.name, "train", d.data_dir)
    docs = (source[i]["text"].decode("utf-8", errors="replace") for i in range(len(source)))
    train_sentencepiece(docs, d.sentencepiece_vocab, path)
  return SentencePieceTokenizer(path)


def save_with_run(tokenizer, run_dir):
  """Copies a model-file tokenizer into the run directory (bytes need nothing)."""
  path = getattr(tokenizer, "path", None)
  if path and os.path.abspath(path) != os.path.abspath(os.path.join(run_dir, RUN_FILE)):
    os.makedirs(run_dir, exist_ok=True)
    shutil.copyfile(path, os.path.join(run_dir, RUN_FILE))
