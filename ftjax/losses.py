"""Losses: token cross-entropy (plain or chunked over tokens) and the free-bits KL.

Shape letters: B batch, T tokens, N = B*T, D model width, V vocabulary; m chunks of n tokens.
"""

import jax
import jax.numpy as jnp


def _nll(logits_nV, targets_n):
  logits = logits_nV.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets_n[:, None], axis=-1)[:, 0]
  return jax.nn.logsumexp(logits, axis=-1) - target_logit


def cross_entropy(x_BTD: jax.Array, unembed_DV: jax.Array, targets_BT: jax.Array, *,
                  chunk_tokens: int = 0, dtype=jnp.float32) -> jax.Array:
  """Per-token negative log-likelihood (B, T) in float32 of logits = x @ unembed.

  With `chunk_tokens` > 0 the logits are made and consumed `chunk_tokens` tokens at a time under
  `jax.checkpoint`, so that neither pass holds more than chunk × V logits (not N × V).
  """
  b, t, d = x_BTD.shape
  x_ND = x_BTD.reshape(b * t, d).astype(dtype)
  w_DV = unembed_DV.astype(dtype)
  targets_N = targets_BT.reshape(b * t)
  if chunk_tokens <= 0 or chunk_tokens >= b * t:
    return _nll(x_ND @ w_DV, targets_N).reshape(b, t)
  n = b * t
  num_chunks = -(-n // chunk_tokens)
  pad = num_chunks * chunk_tokens - n
  x_mnD = jnp.pad(x_ND, ((0, pad), (0, 0))).reshape(num_chunks, chunk_tokens, d)
  targets_mn = jnp.pad(targets_N, (0, pad)).reshape(num_chunks, chunk_tokens)

  @jax.checkpoint
  def chunk_nll(x_nD, targets_n):
    return _nll(x_nD @ w_DV, targets_n)

  _, nll_mn = jax.lax.scan(lambda _, xs: (None, chunk_nll(*xs)), None, (x_mnD, targets_mn))
  return nll_mn.reshape(-1)[:n].reshape(b, t)


def free_bits_kl_BT(kl_BT: jax.Array, kappa) -> jax.Array:
  """max(0, KL_t − κ) per token: the KL term of the loss before averaging over tokens."""
  return jnp.maximum(kl_BT - kappa, 0.0)
