"""The binary mapper, KL and post-samplers against naive references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import latent


def _inputs(n, h, d, seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  logits = 2.0 * jax.random.normal(k1, (n, h))
  codes = latent.bits_to_codes(latent.sample_bits(k2, logits))
  w = jax.random.normal(k3, (2**h, d))
  cot = jax.random.normal(k4, (n, d))
  return logits, codes, w, cot


def _assert_close(actual, expected, rtol=1e-5):
  scale = float(jnp.max(jnp.abs(expected))) or 1.0
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("h,chunk", [(1, 7), (3, 16), (6, 5), (8, 50), (10, 32), (10, 100)])
def test_onehot_post_sampler_matches_dense_formula(h, chunk):
  n, d = 50, 12  # chunk sizes that divide n (5, 50) and that do not (7, 16, 32) or exceed it
  logits, codes, w, cot = _inputs(n, h, d, seed=h)
  chunked = lambda l, w: jnp.sum(latent.onehot_post_sampler(l, codes, w, chunk) * cot)
  dense = lambda l, w: jnp.sum(latent.onehot_post_sampler_dense(l, codes, w) * cot)
  _assert_close(latent.onehot_post_sampler(logits, codes, w, chunk), w[codes])
  _assert_close(latent.onehot_post_sampler_dense(logits, codes, w), w[codes])
  g_chunked = jax.grad(chunked, argnums=(0, 1))(logits, w)
  g_dense = jax.grad(dense, argnums=(0, 1))(logits, w)
  for a, b in zip(g_chunked, g_dense):
    _assert_close(a, b)
  assert float(jnp.max(jnp.abs(g_dense[0]))) > 0  # the check is not vacuous


def test_onehot_post_sampler_under_jit_and_bf16():
  logits, codes, w, cot = _inputs(40, 5, 8)
  f = jax.jit(jax.grad(lambda l, w: jnp.sum(latent.onehot_post_sampler(l, codes, w, 16) * cot),
                       argnums=(0, 1)))
  g32 = f(logits, w)
  g16 = f(logits, w.astype(jnp.bfloat16))
  assert g16[1].dtype == jnp.bfloat16
  np.testing.assert_allclose(g16[0], g32[0], rtol=0.05, atol=0.05 * float(jnp.abs(g32[0]).max()))


def test_code_probs_is_the_product_of_bit_probabilities():
  logits = jnp.array([[0.3, -1.2, 2.0]])
  p = jax.nn.sigmoid(logits[0])
  g = latent.code_probs(logits)[0]
  for k in range(8):
    bits = [(k >> i) & 1 for i in range(3)]
    expected = math.prod(float(p[i]) if b else 1 - float(p[i]) for i, b in enumerate(bits))
    assert abs(float(g[k]) - expected) < 1e-6
  assert abs(float(jnp.sum(g)) - 1) < 1e-6


@pytest.mark.parametrize("h", [1, 4, 8])
def test_kl_matches_brute_force_over_all_codes(h):
  logits = 3.0 * jax.random.normal(jax.random.key(h), (6, h))
  g = np.asarray(latent.code_probs(logits), np.float64)
  brute = np.sum(np.where(g > 0, g * np.log(np.maximum(g, 1e-300) * 2**h), 0.0), axis=-1)
  np.testing.assert_allclose(latent.kl_from_logits(logits), brute, rtol=1e-4, atol=1e-5)


def test_kl_is_stable_and_bounded_for_extreme_logits():
  logits = jnp.array([[1e4, -1e4, 0.0], [80.0, -80.0, 30.0]])
  kl = latent.kl_from_logits(logits)
  assert bool(jnp.all(jnp.isfinite(kl)))
  assert bool(jnp.all(kl >= 0)) and bool(jnp.all(kl <= 3 * math.log(2) + 1e-6))
  np.testing.assert_allclose(kl[0], 2 * math.log(2), rtol=1e-6)
  grads = jax.grad(lambda l: jnp.sum(latent.kl_from_logits(l)))(logits)
  assert bool(jnp.all(jnp.isfinite(grads)))


def test_codes_and_bits_round_trip():
  codes = jnp.arange(2**5)
  bits = latent.codes_to_bits(codes, 5)
  assert bits.shape == (32, 5)
  np.testing.assert_array_equal(latent.bits_to_codes(bits), codes)
  np.testing.assert_array_equal(bits[6], [0, 1, 1, 0, 0])  # bit 0 is the least significant


def test_sample_bits_follows_the_sigmoid():
  logits = jnp.broadcast_to(jnp.array([-2.0, 0.0, 1.5]), (20000, 3))
  freq = jnp.mean(latent.sample_bits(jax.random.key(1), logits), axis=0)
  np.testing.assert_allclose(freq, jax.nn.sigmoid(logits[0]), atol=0.015)


def test_uniform_codes_cover_the_range():
  codes = latent.uniform_codes(jax.random.key(0), (4000,), 3)
  counts = np.bincount(np.asarray(codes), minlength=8)
  assert counts.min() > 400 and codes.max() < 8


def test_bits_post_sampler_value_and_per_bit_straight_through():
  logits, codes, _, cot = _inputs(10, 4, 6)
  bits = latent.codes_to_bits(codes, 4)
  w = jax.random.normal(jax.random.key(3), (4, 6))
  np.testing.assert_allclose(latent.bits_post_sampler(logits, bits, w), (2 * bits - 1) @ w, atol=1e-6)
  grad = jax.grad(lambda l: jnp.sum(latent.bits_post_sampler(l, bits, w) * cot))(logits)
  p = jax.nn.sigmoid(logits)
  np.testing.assert_allclose(grad, 2 * (cot @ w.T) * p * (1 - p), rtol=1e-5, atol=1e-6)
