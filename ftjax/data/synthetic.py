"""The paper's synthetic task, as an infinite deterministic stream keyed by (seed, split, step).

Each sequence: BOS, a capital letter, '>', then a body of 64 characters, all '_' except the
letter repeated `block_len` (8) times at a uniformly random position; every body character is then
independently replaced by '!' with probability `noise_prob` (1/16). A model that knows the task
generates bodies with one block of the prompt's letter at some position, and a Free Transformer can
put that position (and the noise) into its latent Z.
"""

from typing import Any

import numpy as np

BODY_LEN = 64
PAD, BOS, EOS = 0, 1, 2
CHARS = "_!>" + "".join(chr(ord("A") + i) for i in range(26))
FIRST_CHAR = 3  # token id of CHARS[0]
VOCAB_SIZE = FIRST_CHAR + len(CHARS)  # 32
UNDERSCORE, BANG, ARROW = (FIRST_CHAR + CHARS.index(c) for c in "_!>")
FIRST_LETTER = FIRST_CHAR + CHARS.index("A")
PROMPT_LEN = 3  # BOS, letter, '>'
SPLITS = {"train": 0, "validation": 1}


def sequence_length(cfg: Any) -> int:
  """Tokens per sequence; the model sees one fewer (inputs and shifted targets)."""
  del cfg
  return PROMPT_LEN + BODY_LEN


def generate(seed: int, step: int, batch_size: int, *, block_len: int = 8,
             noise_prob: float = 1 / 16,
             split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns (tokens (B, 67) int32, letters (B,) int, positions (B,) int) for this step."""
  rng = np.random.default_rng([seed, SPLITS[split], step])
  letters = rng.integers(0, 26, size=batch_size)
  positions = rng.integers(0, BODY_LEN - block_len + 1, size=batch_size)
  noise = rng.random((batch_size, BODY_LEN)) < noise_prob
  col = np.arange(BODY_LEN)[None, :]
  in_block = (col >= positions[:, None]) & (col < positions[:, None] + block_len)
  body = np.where(in_block, FIRST_LETTER + letters[:, None], UNDERSCORE)
  body = np.where(noise, BANG, body)
  prompt = np.stack([np.full(batch_size, BOS), FIRST_LETTER + letters,
                     np.full(batch_size, ARROW)], axis=1)
  tokens = np.concatenate([prompt, body], axis=1).astype(np.int32)
  return tokens, letters, positions


def decode(tokens: Any) -> str:
  """Token ids to text; BOS/PAD/EOS are dropped."""
  return "".join(CHARS[t - FIRST_CHAR] for t in np.asarray(tokens).tolist() if t >= FIRST_CHAR)


def encode(text: str, bos: bool = True) -> np.ndarray:
  """Characters to tokens; a sequence (or a prompt) starts with BOS."""
  return np.array([BOS] * bos + [FIRST_CHAR + CHARS.index(c) for c in text], dtype=np.int32)


def is_well_formed(body: str, letter: str, block_len: int = 8) -> bool:
  """Whether a generated body is one block of `letter` x block_len in '_', '!' noise aside.

  A '!' may stand anywhere (noise); the non-'!' characters must be '_' except for exactly one
  contiguous run, of length block_len once noise inside it is counted, made of `letter`.
  """
  if len(body) != BODY_LEN:
    return False
  idx = [i for i, c in enumerate(body) if c == letter]
  if not idx or any(c not in "_!" + letter for c in body):
    return False
  lo, hi = idx[0], idx[-1]
  if any(c == "_" for c in body[lo:hi + 1]) or hi - lo + 1 > block_len:
    return False
  # The run may have lost characters to noise at its ends: allow '!' to make up the length.
  left, right = lo, hi
  while right - left + 1 < block_len and left > 0 and body[left - 1] == "!":
    left -= 1
  while right - left + 1 < block_len and right + 1 < BODY_LEN and body[right + 1] == "!":
    right += 1
  return right - left + 1 == block_len


def well_formed(texts: list[str], block_len: int = 8) -> list[bool]:
  """`is_well_formed` for decoded sequences "<letter>><body>" (the letter is the prompt's)."""
  return [len(t) > 2 and is_well_formed(t[2:], t[0], block_len) for t in texts]
