"""Autoregressive sampling with a KV cache, and the full-forward reference it must match.

Shape letters: B batch, P prompt length, X new tokens, T = P + X buffer length, V vocabulary.

Prompts of different lengths are left-padded to P (`left_pad`); `start_B` marks each one's first
real token. `generate` prefills the cache with the prompts in one call, then decodes one token
per step inside a `lax.while_loop` (one dispatch for the whole generation).

How Z is chosen (Free Transformer):
  "uniform": a fresh code drawn uniformly from the 2^H codes at every position (the paper);
  "fixed":   one code per sequence at every position (`codes_B`, or drawn at random), or a
             given code per position (`fixed_codes_BT`, e.g. one draw from the prior shared
             by a group of sequences, as in the paper's figures);
  "encoder": the prompt's codes come from the encoder's posterior over the prompt (sampled, or
             the most likely code with `encoder_argmax`); new tokens then use `new_z`
             ("uniform" or "fixed"). The encoder runs in the prefill only.
"""

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import latent as latent_lib

# How generation chooses Z (above: `z_mode` of `generate`, launch.sample and the lm_eval model);
# the forward passes it makes take Z from one of model.Z_SOURCES.
GENERATION_Z_MODES = ("uniform", "fixed", "encoder")


def left_pad(prompts: list, pad_id: int = 0,
             length: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens (B, P) int32, start_B) from a list of token lists of different lengths; P is
  `length` (at least the longest), by default the longest."""
  length = max(len(p) for p in prompts) if length is None else length
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = p
  return tokens, np.array([length - len(p) for p in prompts], np.int32)


def filter_logits(logits_BV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Masks all but the top-k logits and/or the smallest set whose probability reaches top_p."""
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # The smallest logit kept: the first one at which the cumulative probability reaches top_p.
    cutoff_idx_B1 = jnp.sum(cum_BV < top_p, axis=-1, keepdims=True)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, cutoff_idx_B1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return logits_BV


def sample_token(key: jax.Array, logits_BV: jax.Array, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> jax.Array:
  """A token per row: greedy when temperature == 0, else a filtered categorical sample."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV.astype(jnp.float32) / temperature, top_k, top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def empty_cache(decode_model: Any, batch: int, length: int) -> dict:
  """Zeroed KV caches (and index) for `batch` sequences of up to `length` tokens."""
  shapes = jax.eval_shape(lambda: decode_model.init(
      jax.random.key(0), jnp.zeros((batch, length), jnp.int32), latent_key=jax.random.key(0)))
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def latent_codes(key: jax.Array, lat: Any, shape: tuple, z_mode: str,
                 codes_B: Optional[jax.Array] = None,
                 fixed_codes_BT: Optional[jax.Array] = None) -> jax.Array:
  """(B, T) codes for "uniform" or "fixed" Z (fixed: `fixed_codes_BT`, else `codes_B` at every
  position, else one code drawn per sequence)."""
  if z_mode == "uniform":
    return latent_lib.uniform_codes(key, shape, lat.num_bits)
  if fixed_codes_BT is not None:
    if fixed_codes_BT.shape != shape:
      raise ValueError(f"fixed_codes_BT must have shape {shape} (batch, prompt + new tokens), "
                       f"got {fixed_codes_BT.shape}")
    return fixed_codes_BT.astype(jnp.int32)
  if codes_B is None:
    codes_B = latent_lib.uniform_codes(key, shape[:1], lat.num_bits)
  return jnp.broadcast_to(codes_B[:, None], shape).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    "decode_model", "max_new_tokens", "z_mode", "new_z", "encoder_argmax", "temperature", "top_k",
    "top_p", "eos_id", "return_logits"))
def generate(decode_model: Any, params: dict, prompt_BP: jax.Array, start_B: jax.Array,
             key: jax.Array, *, max_new_tokens: int, z_mode: str = "uniform",
             new_z: str = "uniform", codes_B: Optional[jax.Array] = None,
             fixed_codes_BT: Optional[jax.Array] = None, encoder_argmax: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: Optional[int] = None, return_logits: bool = False) -> dict:
  """Samples `max_new_tokens` after each left-padded prompt with a KV cache.

  Returns a dict: `tokens` (B, P + N; positions after an end-of-sequence token hold eos_id),
  `codes` (B, P + N) for a Free Transformer, `num_generated` and, with `return_logits`,
  `logits` (B, N, V) of every sampled position.
  """
  if z_mode not in GENERATION_Z_MODES:
    raise ValueError(f"z_mode must be one of {GENERATION_Z_MODES}, got {z_mode!r}")
  lat = decode_model.cfg.latent
  b, p = prompt_BP.shape
  total = p + max_new_tokens
  z_key, enc_key, token_key = jax.random.split(key, 3)
  variables = {"params": params, "cache": empty_cache(decode_model, b, total)}
  codes_BT, prefill_mode = None, "zero"
  if lat.enabled:
    codes_BT = latent_codes(z_key, lat, (b, total), new_z if z_mode == "encoder" else z_mode,
                            codes_B, fixed_codes_BT)
    prefill_mode = "given"
    if z_mode == "encoder":
      prefill_mode = "encoder_argmax" if encoder_argmax else "encoder"
  (logits_BPV, aux), mutated = decode_model.apply(
      variables, prompt_BP, z_mode=prefill_mode, latent_key=enc_key,
      codes_BT=None if codes_BT is None else codes_BT[:, :p], start_B=start_B, mutable=["cache"])
  if lat.enabled and z_mode == "encoder":
    codes_BT = codes_BT.at[:, :p].set(aux["codes_BT"])
  tokens_BT = jnp.concatenate([prompt_BP, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)
  logits_BXV = jnp.zeros((b, max_new_tokens if return_logits else 0, logits_BPV.shape[-1]))
  carry = (jnp.zeros((), jnp.int32), mutated["cache"], logits_BPV[:, -1], tokens_BT,
           jnp.zeros((b,), bool), logits_BXV)

  def cond(carry):
    i, _, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, cache, logits_BV, tokens_BT, done_B, logits_BXV = carry
    if return_logits:
      logits_BXV = jax.lax.dynamic_update_index_in_dim(logits_BXV, logits_BV, i, axis=1)
    new_B = sample_token(jax.random.fold_in(token_key, i), logits_BV, temperature, top_k, top_p)
    if eos_id is not None:
      new_B = jnp.where(done_B, eos_id, new_B)
      done_B = done_B | (new_B == eos_id)
    tokens_BT = jax.lax.dynamic_update_index_in_dim(tokens_BT, new_B, p + i, axis=1)
    codes_B1 = (None if codes_BT is None else
                jax.lax.dynamic_slice_in_dim(codes_BT, p + i, 1, axis=1))
    (next_BTV, _), mutated = decode_model.apply(
        {"params": params, "cache": cache}, new_B[:, None], z_mode="given" if lat.enabled else "zero",
        codes_BT=codes_B1, start_B=start_B, mutable=["cache"])
    return i + 1, mutated["cache"], next_BTV[:, 0], tokens_BT, done_B, logits_BXV

  i, _, _, tokens_BT, done_B, logits_BXV = jax.lax.while_loop(cond, body, carry)
  if eos_id is not None:  # a loop that stopped early leaves zeros: mark them as ended
    tokens_BT = jnp.where(jnp.arange(total) >= p + i, eos_id, tokens_BT)
  out = {"tokens": tokens_BT, "num_generated": i}
  if lat.enabled:
    out["codes"] = codes_BT
  if return_logits:
    out["logits"] = logits_BXV
  return out


@functools.partial(jax.jit, static_argnames=("model", "prompt_len", "temperature"))
def sample_full_forward(model: Any, params: dict, prompt_BT: jax.Array, key: jax.Array, *,
                        prompt_len: int,
                        temperature: float = 1.0) -> tuple[jax.Array, Optional[jax.Array]]:
  """The no-cache reference: fills positions prompt_len.. of the (B, T) buffer by re-running the
  full forward pass for every token, with Z uniform per position. Exact (the decoder is causal)
  and slow: what the cached `generate` is measured against. Returns (tokens_BT, codes_BT)."""
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
