"""The Free Transformer's binary mapper, KL and post-samplers.

Shape letters: N tokens (B*T flattened), H latent bits, C = 2^H codes, D model width; in the
backward, m chunks of n tokens, and U, Y the codes of the upper and lower halves of the bits.

The mapper samples H independent bits per token, B_h ~ Bernoulli(sigmoid(logit_h)), and the code
z = Σ_h B_h 2^h. The paper's one-hot post-sampler computes R = Y_st W with
Y_st = Y + G − stop_gradient(G), Y the one-hot of z and G_k = Π_h p_h^{b_kh} (1 − p_h)^{1 − b_kh}
the posterior probability of every code. Its value is the row gather W[z]; its gradient needs
dR Wᵀ against all C codes for every token. `onehot_post_sampler` computes exactly that gradient
with a custom VJP that walks over chunks of tokens, so that no more than chunk × C values of G
exist at once (the dense form holds N × C).
"""

import functools
import math

import jax
import jax.numpy as jnp


def sample_bits(key: jax.Array, logits_NH: jax.Array) -> jax.Array:
  """Bernoulli(sigmoid(logits)) bits as int32."""
  return jax.random.bernoulli(key, jax.nn.sigmoid(logits_NH.astype(jnp.float32))).astype(jnp.int32)


def bits_to_codes(bits_NH: jax.Array) -> jax.Array:
  """Code index Σ_h bits_h 2^h (bit 0 is the least significant)."""
  h = bits_NH.shape[-1]
  return jnp.sum(bits_NH.astype(jnp.int32) << jnp.arange(h, dtype=jnp.int32), axis=-1)


def codes_to_bits(codes_N: jax.Array, num_bits: int) -> jax.Array:
  return (codes_N[..., None] >> jnp.arange(num_bits, dtype=jnp.int32)) & 1


def uniform_codes(key: jax.Array, shape: tuple, num_bits: int) -> jax.Array:
  """Codes drawn uniformly from the 2^H codes (the prior used at generation)."""
  return jax.random.randint(key, shape, 0, 2**num_bits, dtype=jnp.int32)


def kl_from_logits(logits_NH: jax.Array) -> jax.Array:
  """KL(Q(z | logits) ‖ uniform over 2^H codes) per token, in nats, from log-sigmoids.

  KL = H log 2 + Σ_h [p log p + (1 − p) log(1 − p)], p = sigmoid(logit).
  """
  l = logits_NH.astype(jnp.float32)
  log_p, log_q = jax.nn.log_sigmoid(l), jax.nn.log_sigmoid(-l)
  neg_entropy = jnp.exp(log_p) * log_p + jnp.exp(log_q) * log_q
  return logits_NH.shape[-1] * math.log(2) + jnp.sum(neg_entropy, axis=-1)


def code_bits(num_bits: int) -> jax.Array:
  """The (2^num_bits, num_bits) float32 matrix of every code's bits: row k holds the bits of k."""
  codes = jnp.arange(2**num_bits, dtype=jnp.int32)
  return codes_to_bits(codes, num_bits).astype(jnp.float32)


def _partial_code_probs(logits_nh):
  """(n, 2^h) probabilities of every code of these h bits: log G_k = Σ log(1 − p) + Σ b_k l."""
  return jnp.exp(jnp.sum(jax.nn.log_sigmoid(-logits_nh), axis=-1, keepdims=True)
                 + logits_nh @ code_bits(logits_nh.shape[-1]).T)


def split_code_probs(logits_nH: jax.Array) -> tuple:
  """G as two factors: (g_hi (n, U), g_lo (n, Y)) with G[n, u·Y + y] = g_hi[n, u] · g_lo[n, y].

  The low H//2 bits index y, the high bits index u. Only O(n·2^(H/2)) values are computed; the
  n × C product is formed where it is consumed, with one multiply per element and no exp.
  """
  l = logits_nH.astype(jnp.float32)
  low = l.shape[-1] // 2
  return _partial_code_probs(l[:, low:]), _partial_code_probs(l[:, :low])


def code_probs(logits_nH: jax.Array) -> jax.Array:
  """G (n, C): the probability of every code under the H independent Bernoullis."""
  g_hi_nU, g_lo_nY = split_code_probs(logits_nH)
  return (g_hi_nU[:, :, None] * g_lo_nY[:, None, :]).reshape(logits_nH.shape[0], -1)


def _logits_grad_chunk(logits_nH, dr_nD, w_CD):
  """d loss / d logits for one chunk: Σ_k dG_k ∂G_k/∂l_h = Σ_k dG_k G_k (b_kh − p_h).

  With a_k = dG_k G_k: the sums of a over the codes whose bit h is set are sums over one axis
  of the (n, U, Y) view of a, followed by small matmuls with the bit tables.
  """
  n, h = logits_nH.shape
  g_hi_nU, g_lo_nY = split_code_probs(logits_nH)
  dg_nC = jnp.einsum("nd,cd->nc", dr_nD, w_CD, preferred_element_type=jnp.float32)
  a_nUY = dg_nC.reshape(n, g_hi_nU.shape[1], g_lo_nY.shape[1]) * g_hi_nU[:, :, None] * g_lo_nY[:, None, :]
  sum_lo_nY, sum_hi_nU = jnp.sum(a_nUY, axis=1), jnp.sum(a_nUY, axis=2)
  low = h // 2
  bit_sums_nH = jnp.concatenate([sum_lo_nY @ code_bits(low), sum_hi_nU @ code_bits(h - low)], -1)
  p_nH = jax.nn.sigmoid(logits_nH.astype(jnp.float32))
  return bit_sums_nH - p_nH * jnp.sum(sum_hi_nU, axis=-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def onehot_post_sampler(logits_NH, codes_N, w_CD, chunk_tokens):
  """R = W[codes] with the straight-through gradient of (Y + G − sg(G)) W, memory-bounded.

  Gradients: dW = Yᵀ dR (a scatter-add of dR into the sampled rows) and d logits through G,
  computed `chunk_tokens` tokens at a time. `codes_N` gets no gradient.
  """
  del logits_NH, chunk_tokens
  return jnp.take(w_CD, codes_N, axis=0)


def _onehot_fwd(logits_NH, codes_N, w_CD, chunk_tokens):
  return jnp.take(w_CD, codes_N, axis=0), (logits_NH, codes_N, w_CD)


def _onehot_bwd(chunk_tokens, res, dr_ND):
  logits_NH, codes_N, w_CD = res
  n, h = logits_NH.shape
  dw_CD = jnp.zeros(w_CD.shape, jnp.float32).at[codes_N].add(dr_ND.astype(jnp.float32))
  chunk = min(chunk_tokens, n)
  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n
  logits_mnH = jnp.pad(logits_NH, ((0, pad), (0, 0))).reshape(num_chunks, chunk, h)
  dr_mnD = jnp.pad(dr_ND, ((0, pad), (0, 0))).reshape(num_chunks, chunk, -1)
  body = lambda _, xs: (None, _logits_grad_chunk(xs[0], xs[1], w_CD))
  _, dlogits_mnH = jax.lax.scan(body, None, (logits_mnH, dr_mnD))
  dlogits_NH = dlogits_mnH.reshape(-1, h)[:n].astype(logits_NH.dtype)
  return dlogits_NH, None, dw_CD.astype(w_CD.dtype)


onehot_post_sampler.defvjp(_onehot_fwd, _onehot_bwd)


def onehot_post_sampler_dense(logits_NH: jax.Array, codes_N: jax.Array,
                              w_CD: jax.Array) -> jax.Array:
  """The reference formulation (N × C memory): (Y + (G − sg(G))) W. For tests only."""
  y_NC = jax.nn.one_hot(codes_N, w_CD.shape[0], dtype=jnp.float32)
  g_NC = code_probs(logits_NH)
  return (y_NC + (g_NC - jax.lax.stop_gradient(g_NC))) @ w_CD


def bits_post_sampler(logits_NH: jax.Array, bits_NH: jax.Array, w_HD: jax.Array) -> jax.Array:
  """The factored map R = (2B − 1) W with a per-bit straight-through gradient B + p − sg(p)."""
  p_NH = jax.nn.sigmoid(logits_NH.astype(jnp.float32))
  b_NH = bits_NH.astype(jnp.float32) + (p_NH - jax.lax.stop_gradient(p_NH))
  return (2 * b_NH - 1).astype(w_HD.dtype) @ w_HD
