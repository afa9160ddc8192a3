"""Data sources: `make_source(cfg)` gives batches of {'inputs', 'targets'} keyed by step."""

import dataclasses
from typing import Callable

import numpy as np

from ftjax.data import synthetic, text


@dataclasses.dataclass(frozen=True)
class Source:
  """A deterministic, infinite stream of batches: `batch(step, split)` is a pure function."""
  name: str
  # (step, batch_size, split, rows) -> (rows of the batch, T+1)
  make_tokens: Callable[[int, int, str, slice], np.ndarray]
  prompts: Callable[[int], np.ndarray]  # n -> (n, P) prompts for samples
  decode: Callable[[np.ndarray], str]
  encode: Callable[[str, bool], np.ndarray]  # (text, starts a sequence) -> tokens
  bytes_per_token: float  # for bits-per-byte; 0 when the data is not text

  def batch(self, step, batch_size, split="train", rows=slice(None)):
    """Rows `rows` of the global batch of `step` (all rows by default)."""
    tokens = self.make_tokens(step, batch_size, split, rows)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def make_source(cfg):
  """The data source named by `cfg.data.name`, seeded by `cfg.seed`."""
  d = cfg.data
  if d.name == "synthetic":
    def make_tokens(step, batch_size, split, rows):  # cheap: made whole, then sliced
      return synthetic.generate(cfg.seed, step, batch_size, block_len=d.block_len,
                                noise_prob=d.noise_prob, split=split)[0][rows]
    def prompts(n):  # BOS, letter, '>' for letters spread over the alphabet
      letters = (np.arange(n) * 7) % 26
      return np.stack([np.full(n, synthetic.BOS), synthetic.FIRST_LETTER + letters,
                       np.full(n, synthetic.ARROW)], axis=1).astype(np.int32)
    return Source("synthetic", make_tokens, prompts, synthetic.decode,
                  lambda text, start=True: synthetic.encode(text, bos=start),
                  0.0)
  corpus = text.load_corpus(d.name, d.eval_fraction)

  def make_tokens(step, batch_size, split, rows):
    return text.generate(corpus[split], cfg.seed, step, batch_size, cfg.model.seq_len + 1, split,
                         rows)
  def prompts(n):  # the first 16 bytes of held-out crops
    return make_tokens(0, n, "validation", slice(None))[:, :16]
  return Source(d.name, make_tokens, prompts, text.decode,
                lambda string, start=True: text.encode(string), 1.0)
