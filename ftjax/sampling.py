"""Sampling by re-running the full forward pass for every new token (no KV cache).

Simple and exact: the decoder is causal, so the logits at position t depend only on tokens ≤ t
and codes ≤ t, whatever the buffer holds after t. Costs a full forward per token; it is the
reference that a cached decoder must match.

Shape letters: B batch, P prompt length, T buffer length (the model's seq_len), V vocabulary.
"""

import functools

import jax
import jax.numpy as jnp

from ftjax import latent as latent_lib


def sample_token(key, logits_BV, temperature):
  """Categorical sample at `temperature`; greedy when temperature == 0."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_BV / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "prompt_len", "temperature"))
def sample_full_forward(model, params, prompt_BT, key, *, prompt_len, temperature=1.0):
  """Fills positions prompt_len.. of the (B, T) buffer `prompt_BT` token by token.

  For a Free Transformer, Z is drawn uniformly from the 2^H codes at every position (the
  paper's generation). Returns (tokens_BT, codes_BT or None).
  """
  b, t = prompt_BT.shape
  code_key, token_key = jax.random.split(key)
  lat = model.cfg.latent
  codes_BT = latent_lib.uniform_codes(code_key, (b, t), lat.num_bits) if lat.enabled else None
  z_mode = "given" if lat.enabled else "zero"

  def step(pos, tokens_BT):
    logits_BTV, _ = model.apply({"params": params}, tokens_BT, z_mode=z_mode, codes_BT=codes_BT)
    logits_BV = jax.lax.dynamic_index_in_dim(logits_BTV, pos - 1, axis=1, keepdims=False)
    new_B = sample_token(jax.random.fold_in(token_key, pos), logits_BV, temperature)
    return jax.lax.dynamic_update_index_in_dim(tokens_BT, new_B, pos, axis=1)

  tokens_BT = jax.lax.fori_loop(prompt_len, t, step, prompt_BT)
  return tokens_BT, codes_BT
