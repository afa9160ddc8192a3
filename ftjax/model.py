"""One Transformer module for the Free Transformer and its baseline.

Shape letters: B batch, T tokens, D model width, V vocabulary, H latent bits, C = 2^H codes.

Layout of the L blocks (`inject_layer` = I, default L/2):

    embed → scan(I causal blocks) → [latent] → inject block → scan(L − I − 1 causal blocks)
          → final norm → unembed (or the embedding transposed, `model.tie_embeddings`)

The inject block is the (I+1)-th decoder block; with the latent enabled its keys/values see
X_I + R. The latent path (module `latent`) holds the encoder block (non-causal, queries from the
learned constant ζ, keys/values from X_I), the readout D → H and the post-sampler. With
`model.latent.enabled=False` it is absent and the same parameters, created from the same PRNG
paths, form the baseline.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ftjax import latent as latent_lib
from ftjax.configs import REMAT_POLICIES
from ftjax.layers import ACTIVATION_AXES, Block, Einsum, RMSNorm, Span

# Where a forward pass takes Z from (`z_mode` of `Transformer.__call__`); how generation chooses
# Z is sampling.GENERATION_Z_MODES.
Z_SOURCES = ("encoder", "encoder_argmax", "uniform", "given", "zero")



class _ScannedBlock(nn.Module):
  """A causal block with the (carry, out) signature that nn.scan expects."""
  cfg: Any
  decode: bool = False

  @nn.compact
  def __call__(self, x_BTD, span):
    return Block(self.cfg, decode=self.decode, name="block")(x_BTD, span), None


def block_stack(cfg, length: int, name: str, decode: bool = False) -> nn.Module:
  """`length` causal blocks with stacked parameters and caches (leading `layers` axis), run by
  nn.scan; rematerialised by the config's policy when training."""
  block = _ScannedBlock
  if cfg.remat_policy != "none" and not decode:
    policy = REMAT_POLICIES[cfg.remat_policy]
    block = nn.remat(block, policy=policy and getattr(jax.checkpoint_policies, policy),
                     prevent_cse=False)
  return nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                 in_axes=nn.broadcast, length=length,
                 metadata_params={nn.PARTITION_NAME: "layers"})(cfg, decode, name=name)


def _per_row(key):
  """True for a batch of keys, one per row (training: see `train.row_keys`)."""
  return key is not None and key.ndim == 1


class LatentPath(nn.Module):
  """Encoder block + readout + binary mapper + post-sampler: X_I ↦ (R, aux)."""
  cfg: Any

  @nn.compact
  def __call__(self, x_BTD, span, z_mode, key, codes_BT):
    m, lat = self.cfg, self.cfg.latent
    b, t, d = x_BTD.shape
    h = lat.num_bits
    # "onehot": a row per code (2^H × D); "bits": a row per bit (H × D).
    rows, axis, std = ((2**h, "codes", 1.0) if lat.post_sampler == "onehot" else
                       (h, "latent_bits", h**-0.5))
    init = nn.initializers.zeros if lat.zero_init_post_sampler else nn.initializers.normal(std)
    w = self.param("post_sampler", nn.with_logical_partitioning(init, (axis, "embed")), (rows, d),
                   jnp.float32)
    if self.is_initializing() or z_mode.startswith("encoder"):
      zeta_D = self.param("zeta", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                               ("embed",)), (d,), jnp.float32)
      zeta_BTD = jnp.broadcast_to(zeta_D, (b, t, d))
      enc_BTD = Block(m, causal=False, use_rope=lat.encoder_rope, matmul_dtype="default",
                      name="encoder_block")(zeta_BTD, span, kv_BSD=x_BTD)
      enc_BTD = RMSNorm(m.norm_eps, jnp.float32, name="encoder_norm")(enc_BTD)
      logits_BTH = Einsum("btd,dh->bth", (d, h), ("embed", "latent_bits"), 1, jnp.float32,
                          name="readout")(enc_BTD)
      logits_NH = logits_BTH.reshape(b * t, h)
      if z_mode == "encoder_argmax":  # the most likely code
        bits_NH = (logits_NH > 0).astype(jnp.int32)
      elif _per_row(key):
        bits_NH = jax.vmap(latent_lib.sample_bits)(key, logits_BTH).reshape(b * t, h)
      else:
        bits_NH = latent_lib.sample_bits(key, logits_NH)
      codes_N = latent_lib.bits_to_codes(bits_NH)
      aux = {"kl_BT": latent_lib.kl_from_logits(logits_BTH), "latent_logits_BTH": logits_BTH}
    else:
      if z_mode == "uniform" and _per_row(key):
        codes_BT = jax.vmap(lambda k: latent_lib.uniform_codes(k, (t,), h))(key)
      elif z_mode == "uniform":
        codes_BT = latent_lib.uniform_codes(key, (b, t), h)
      elif z_mode == "zero":
        return jnp.zeros_like(x_BTD), {}
      codes_N = codes_BT.reshape(b * t)
      bits_NH = latent_lib.codes_to_bits(codes_N, h)
      logits_NH = jnp.zeros((b * t, h), jnp.float32)  # no gradient path without the encoder
      aux = {}
    dtype = jnp.dtype(m.dtype)
    if lat.post_sampler == "onehot":
      r_ND = latent_lib.onehot_post_sampler(logits_NH, codes_N, w.astype(dtype), lat.chunk_tokens)
    else:
      r_ND = latent_lib.bits_post_sampler(logits_NH, bits_NH, w.astype(dtype))
    aux["codes_BT"] = codes_N.reshape(b, t)
    return r_ND.reshape(b, t, d).astype(x_BTD.dtype), aux


class Transformer(nn.Module):
  """Llama-style decoder; a Free Transformer when `cfg.latent.enabled`.

  `cfg` is the resolved `model` config. Call with `z_mode`:
    "encoder": Z sampled from the encoder's posterior (training; needs `latent_key`),
    "encoder_argmax": Z = the posterior's most likely code (every bit with logit > 0),
    "uniform": Z uniform over the 2^H codes per token (generation; needs `latent_key`),
  `latent_key` is one key, or one key per row (B,): then row b's Z depends on its key alone.
    "given":   Z = `codes_BT`,
    "zero":    R = 0 (the FT then computes the baseline function of its shared weights).
  Returns (logits_BTV, aux), or (x_BTD after the final norm, aux) with `return_hidden=True`.
  aux holds `kl_BT`, `latent_logits_BTH` (encoder mode) and `codes_BT` when the latent runs.

  Prompts of different lengths are left-padded; `start_B` is each sequence's first real token
  (keys before it are masked, RoPE positions count from it). With `decode=True` the decoder
  blocks keep their keys/values in the "cache" collection (allocated by `init` at the length of
  the tokens it is given) and each call appends its tokens at the cache index.

  Packed rows (several documents) pass `segment_ids_BT` (1, 2, … per document, 0 for padding)
  and `positions_BT` (each document's positions from 0): attention, the encoder's included,
  stays inside a document and RoPE restarts with it.
  """
  cfg: Any
  decode: bool = False

  @nn.compact
  def __call__(self, tokens_BT, *, z_mode="encoder", latent_key=None,
               codes_BT: Optional[jax.Array] = None, return_hidden=False, start_B=None,
               segment_ids_BT: Optional[jax.Array] = None,
               positions_BT: Optional[jax.Array] = None):
    m = self.cfg
    if z_mode not in Z_SOURCES:
      raise ValueError(f"z_mode must be one of {Z_SOURCES}, got {z_mode!r}")
    b, t = tokens_BT.shape
    left_padded = start_B is not None
    start_B = jnp.zeros((b,), jnp.int32) if start_B is None else start_B
    offset = jnp.zeros((), jnp.int32)
    if self.decode:
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      offset = index.value
      index.value = offset + t
    span = Span(offset, start_B, segment_ids_BT, positions_BT, left_padded=left_padded)
    embed_init = nn.initializers.normal(m.d_model**-0.5 if m.tie_embeddings else 1.0)
    embed_VD = self.param("embed", nn.with_logical_partitioning(embed_init, ("vocab", "embed")),
                          (m.vocab_size, m.d_model), jnp.float32)
    x_BTD = jnp.take(embed_VD, tokens_BT, axis=0).astype(jnp.float32)  # float32 residual stream
    x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
    inject = m.latent.inject_layer
    if inject > 0:
      x_BTD, _ = block_stack(m, inject, "layers_lo", self.decode)(x_BTD, span)
    r_BTD, aux = None, {}
    if m.latent.enabled:
      r_BTD, aux = LatentPath(m, name="latent")(x_BTD, span, z_mode, latent_key, codes_BT)
    x_BTD = Block(m, decode=self.decode, name="inject_block")(x_BTD, span, kv_extra_BTD=r_BTD)
    if m.num_layers - inject - 1 > 0:
      x_BTD, _ = block_stack(m, m.num_layers - inject - 1, "layers_hi", self.decode)(x_BTD, span)
    x_BTD = RMSNorm(m.norm_eps, jnp.dtype(m.dtype), name="final_norm")(x_BTD)
    if m.tie_embeddings:
      dtype = jnp.dtype(m.dtype)
      unembed = lambda x: jnp.einsum("btd,vd->btv", x.astype(dtype), embed_VD.astype(dtype))
    else:
      unembed = Einsum("btd,dv->btv", (m.d_model, m.vocab_size), ("embed", "vocab"), 1,
                       jnp.dtype(m.dtype), name="unembed")
    if return_hidden:
      if self.is_initializing() and not m.tie_embeddings:
        unembed(x_BTD[:, :1])
      return x_BTD, aux
    return unembed(x_BTD).astype(jnp.float32), aux


def unembed_kernel(params: Any, model_cfg: Any) -> jax.Array:
  """The (D, V) output projection of `params`: the unembed kernel, or the embedding transposed
  when `model.tie_embeddings` (for losses that take the hidden states, return_hidden=True)."""
  if model_cfg.tie_embeddings:
    return params["embed"].T
  return params["unembed"]["kernel"]


def make_model(model_cfg, decode: bool = False) -> "Transformer":
  """The Transformer for a resolved `model` config (frozen, so the module is hashable)."""
  return Transformer(ml_collections.FrozenConfigDict(model_cfg), decode)
