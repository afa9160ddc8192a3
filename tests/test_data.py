"""Data: the synthetic task's spec and determinism, byte tokens."""

import numpy as np

from ftjax.data import synthetic, text


def test_synthetic_sequences_follow_the_spec():
  tokens, letters, positions = synthetic.generate(0, 0, 512)
  assert tokens.shape == (512, 67) and tokens.dtype == np.int32
  assert (tokens[:, 0] == synthetic.BOS).all() and (tokens[:, 2] == synthetic.ARROW).all()
  body = tokens[:, 3:]
  for row, letter, pos in zip(body, letters, positions):
    clean = row != synthetic.BANG
    block = np.zeros(64, bool)
    block[pos:pos + 8] = True
    assert (row[clean & block] == synthetic.FIRST_LETTER + letter).all()
    assert (row[clean & ~block] == synthetic.UNDERSCORE).all()
  noise = np.mean(body == synthetic.BANG)
  assert abs(noise - 1 / 16) < 0.01
  assert positions.min() == 0 and positions.max() == 56 and len(set(letters)) == 26


def test_synthetic_stream_is_deterministic_per_seed_step_and_split():
  a = synthetic.generate(3, 7, 4)[0]
  np.testing.assert_array_equal(a, synthetic.generate(3, 7, 4)[0])
  assert not np.array_equal(a, synthetic.generate(3, 8, 4)[0])
  assert not np.array_equal(a, synthetic.generate(4, 7, 4)[0])
  assert not np.array_equal(a, synthetic.generate(3, 7, 4, split="validation")[0])


def test_synthetic_well_formed_check():
  tokens = synthetic.generate(0, 0, 64)[0]
  texts = [synthetic.decode(t) for t in tokens]
  assert all(synthetic.is_well_formed(s[2:], s[0]) for s in texts)
  assert not synthetic.is_well_formed("_" * 64, "A")
  assert not synthetic.is_well_formed("AAAA" + "_" * 4 + "AAAA" + "_" * 52, "A")
  assert not synthetic.is_well_formed("B" * 8 + "_" * 56, "A")
  np.testing.assert_array_equal(synthetic.encode(texts[0]), tokens[0])


def test_byte_tokens_round_trip():
  s = "To be, or not to be — that is the question.\n"
  tokens = text.encode(s)
  assert tokens.min() >= text.BYTE_OFFSET and tokens.max() < text.VOCAB_SIZE
  assert text.decode(tokens) == s
  assert text.decode([text.BOS, *tokens, text.VOCAB_SIZE + 3]) == s  # specials, padding ids
