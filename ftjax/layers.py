"""Decoder building blocks: RMSNorm, RoPE, einsum dense, grouped-query attention, SwiGLU MLP.

Shape letters: B batch, T query positions, S key positions, D model width, Q query heads,
K key/value heads, G = Q // K query heads per key/value head, E head dim, F MLP hidden; with
query chunks, m chunks of t queries (docs/architecture.md, "Conventions", has the project-wide
legend).
Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab`); `ftjax.sharding` maps them to mesh axes. Layers never mention mesh axes.
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ftjax import fp8 as fp8_lib

Dtype = Any
ACTIVATION_AXES = ("batch", "length", "embed")  # logical axes of the residual stream
GPU_IMPLS = ("cudnn", "cudnn_mask", "pallas")  # attention kernels that need a GPU
# Runs of equal segment ids (documents, padding) per row that cuDNN's packed attention is
# compiled for; a batch with a row holding more takes the dense-mask path (`_attend_cudnn`).
PACKED_MAX_SEGMENTS = 64


@flax.struct.dataclass
class Span:
  """Where one call's T tokens sit in the sequence buffer, and which keys each query may see.

  offset:        buffer index of the call's first token (0 in training; the cache index when
                 decoding).
  start_B:       buffer index of each sequence's first real token; prompts of different lengths
                 are left-padded, and keys before start_B are masked out.
  segment_ids_BT: packed documents (training, scoring): 1, 2, … per document in a row, 0 for
                 padding; a query sees only keys of its own segment. None: one segment.
  positions_BT:  RoPE positions (each document's from 0); None: buffer index − start_B.
  left_padded:   static; False when start_B is known to be 0 (no start mask needed).
  """
  offset: Any
  start_B: Any
  segment_ids_BT: Any = None
  positions_BT: Any = None
  left_padded: bool = flax.struct.field(pytree_node=False, default=True)

  @classmethod
  def full(cls, batch):
    return cls(jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32), left_padded=False)

  def positions(self, t):
    """RoPE positions (B, T) of the call's tokens: buffer index − start, 0 in the padding."""
    if self.positions_BT is not None:
      return self.positions_BT
    return jnp.maximum(self.offset + jnp.arange(t, dtype=jnp.int32) - self.start_B[:, None], 0)


def fan_in_init(num_in_axes: int) -> Callable:
  """Normal init with std 1/sqrt(fan_in), fan_in = product of the first `num_in_axes` dims."""

  def init(key, shape, dtype=jnp.float32):
    fan_in = 1
    for d in shape[:num_in_axes]:
      fan_in *= d
    return jax.random.normal(key, shape, dtype) * fan_in**-0.5

  return init


class Einsum(nn.Module):
  """A dense layer as one einsum against a full-shape kernel with logical axis names."""
  equation: str
  shape: Sequence[int]
  axes: Sequence[str]
  num_in_axes: int = 1
  dtype: Dtype = jnp.float32
  kernel_init: Optional[Callable] = None
  fp8: bool = False  # the matmul in FP8 (`ftjax.fp8.einsum`)

  @nn.compact
  def __call__(self, x):
    init = self.kernel_init or fan_in_init(self.num_in_axes)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
                        tuple(self.shape), jnp.float32)
    if self.fp8:
      return fp8_lib.einsum(self.equation, x, kernel, self.dtype)
    return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))


class RMSNorm(nn.Module):
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD):
    scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                         (x_BTD.shape[-1],), jnp.float32)
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_D).astype(self.dtype)


def rope_frequencies(half, theta, scaling=None):
  """RoPE's `half` angular frequencies in float32. `scaling` = (factor, low_freq_factor,
  high_freq_factor, original_max_position_embeddings) applies Llama 3's rescaling: wavelengths
  above original/low_freq_factor are stretched by `factor`, those below original/high_freq_factor
  kept, those between interpolated (as Hugging Face's rope_type "llama3")."""
  freq_E = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if scaling is None:
    return freq_E
  factor, low, high, original = scaling
  wavelen_E = 2 * jnp.pi / freq_E
  smooth_E = (original / wavelen_E - low) / (high - low)
  scaled_E = jnp.where(wavelen_E > original / low, freq_E / factor, freq_E)
  medium_E = (wavelen_E <= original / low) & (wavelen_E >= original / high)
  return jnp.where(medium_E, (1 - smooth_E) * freq_E / factor + smooth_E * freq_E, scaled_E)


def rope(x_BTQE, positions_BT, theta, scaling=None):
  """Rotary position embedding (rotate-half convention, as Hugging Face Llama), computed in
  float32; `scaling`: see `rope_frequencies`."""
  half = x_BTQE.shape[-1] // 2
  freq_E = rope_frequencies(half, theta, scaling)
  angle_BTE = positions_BT[..., None].astype(jnp.float32) * freq_E
  sin, cos = jnp.sin(angle_BTE)[:, :, None, :], jnp.cos(angle_BTE)[:, :, None, :]
  x = x_BTQE.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTQE.dtype)


def resolve_attention_impl(impl, dtype, head_dim, backend=None):
  """The implementation `impl` names on `backend` (default: jax's): "auto" picks cuDNN flash
  attention on GPU for 16-bit compute with a head dim it supports (packed rows through cuDNN's
  segment offsets, see `_attend_cudnn`), splash attention on TPU, XLA otherwise. A kernel the
  backend lacks is a ValueError naming the backend."""
  backend = backend or jax.default_backend()
  if impl == "auto" and backend == "tpu":
    return "splash"
  if impl == "auto":
    cudnn_ok = jnp.dtype(dtype).itemsize == 2 and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if backend == "gpu" and cudnn_ok else "xla"
  if impl in GPU_IMPLS and backend != "gpu":
    raise ValueError(f"attention_impl={impl!r} needs a GPU; the backend is {backend!r}")
  if impl in GPU_IMPLS and jnp.dtype(dtype).itemsize != 2:
    raise ValueError(f"attention_impl={impl!r} needs model.dtype='bfloat16'")
  if impl == "splash" and backend != "tpu":
    raise ValueError(f"attention_impl='splash' needs a TPU; the backend is {backend!r}")
  return impl


def attention_mask(q_offset, t, s, span, q_segment_ids_BT, causal):
  """(B, T, S) bool: which keys each query sees, or None when every key is visible. Queries
  are the buffer indices q_offset.. q_offset + t; keys 0..s."""
  key_S = jnp.arange(s)
  mask_BTS = None
  if span.left_padded:
    mask_BTS = (key_S >= span.start_B[:, None])[:, None, :]
  if causal:
    q_T = q_offset + jnp.arange(t)
    causal_1TS = (q_T[:, None] >= key_S[None, :])[None]
    mask_BTS = causal_1TS if mask_BTS is None else mask_BTS & causal_1TS
  if span.segment_ids_BT is not None:
    same_BTS = q_segment_ids_BT[:, :, None] == span.segment_ids_BT[:, None, :]
    mask_BTS = same_BTS if mask_BTS is None else mask_BTS & same_BTS
  return mask_BTS


def _attend_block(q_BTKGE, k_BSKE, v_BSKE, q_offset, span, q_segment_ids_BT, causal):
  """Softmax attention of a block of queries (the first at buffer index q_offset) over the keys
  that `attention_mask` lets it see."""
  b, t, _, _, e = q_BTKGE.shape
  logits_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE,
                            preferred_element_type=jnp.float32) * e**-0.5
  mask_BTS = attention_mask(q_offset, t, k_BSKE.shape[1], span, q_segment_ids_BT, causal)
  if mask_BTS is not None:
    mask_BTS = jnp.broadcast_to(mask_BTS, (b, t, k_BSKE.shape[1]))
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKE.dtype)
  return jnp.einsum("bkgts,bske->btkge", probs_BKGTS, v_BSKE)


def _attend_xla(q_BTKGE, k_BSKE, v_BSKE, causal, q_chunk, span):
  """The einsum form; with `q_chunk` > 0 the queries go `q_chunk` at a time under
  jax.checkpoint, so the score matrix held in either pass is q_chunk × S instead of T × S."""
  b, t = q_BTKGE.shape[:2]
  q_seg_BT = span.segment_ids_BT
  if q_chunk <= 0 or q_chunk >= t:
    return _attend_block(q_BTKGE, k_BSKE, v_BSKE, span.offset, span, q_seg_BT, causal)
  num_chunks = -(-t // q_chunk)
  pad = num_chunks * q_chunk - t
  q_BTKGE = jnp.pad(q_BTKGE, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
  q_mBtKGE = jnp.moveaxis(q_BTKGE.reshape(b, num_chunks, q_chunk, *q_BTKGE.shape[2:]), 1, 0)
  q_seg_mBt = None  # scanned as an empty tree when there are no segments
  if q_seg_BT is not None:
    q_seg_mBt = jnp.moveaxis(jnp.pad(q_seg_BT, ((0, 0), (0, pad))).reshape(b, num_chunks, q_chunk),
                             1, 0)
  block = jax.checkpoint(lambda q, offset, seg: _attend_block(
      q, k_BSKE, v_BSKE, offset, span, seg, causal))
  offsets = span.offset + jnp.arange(num_chunks) * q_chunk
  _, out_mBtKGE = jax.lax.scan(lambda _, xs: (None, block(*xs)), None,
                               (q_mBtKGE, offsets, q_seg_mBt))
  out_BTKGE = jnp.moveaxis(out_mBtKGE, 0, 1).reshape(b, -1, *q_BTKGE.shape[2:])
  return out_BTKGE[:, :t]


def _attend_dot_product(q_BTKGE, k_BSKE, v_BSKE, causal, span, implementation):
  """`jax.nn.dot_product_attention` (cuDNN flash attention with implementation="cudnn").
  Queries must start at buffer index 0 (training, scoring, prefill). Causal attention without
  padding or packing runs the kernel's own causal mask; otherwise a (B, 1, T, S) mask is passed."""
  b, t, k, g, e = q_BTKGE.shape
  mask = None
  if span.left_padded or span.segment_ids_BT is not None:
    mask = attention_mask(0, t, k_BSKE.shape[1], span, span.segment_ids_BT, causal)
    mask = jnp.broadcast_to(mask, (b, t, k_BSKE.shape[1]))[:, None]
  out_BTQE = jax.nn.dot_product_attention(
      q_BTKGE.reshape(b, t, k * g, e), k_BSKE, v_BSKE, mask=mask,
      is_causal=causal and mask is None, implementation=implementation)
  return out_BTQE.reshape(b, t, k, g, e)


def segment_runs(segment_ids_BT, max_runs):
  """Each row's runs of equal segment ids in cuDNN's packed layout: (starts_BR, lengths_BM,
  count_B), R = max_runs + 1 columns of run starts and M = max_runs of run lengths, -1 past the
  row's runs; count_B runs per row (only the first max_runs are listed)."""
  b, t = segment_ids_BT.shape
  new_BT = jnp.concatenate([jnp.ones((b, 1), bool),
                            segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  starts_BR = jax.vmap(lambda row: jnp.nonzero(row, size=max_runs + 1, fill_value=-1)[0])(new_BT)
  starts_BR = starts_BR.astype(jnp.int32)
  next_BR = jnp.concatenate([starts_BR[:, 1:], jnp.full((b, 1), -1, jnp.int32)], axis=1)
  ends_BR = jnp.where(next_BR >= 0, next_BR, t)
  lengths_BM = jnp.where(starts_BR >= 0, ends_BR - starts_BR, -1)[:, :max_runs]
  return starts_BR, lengths_BM, jnp.sum(new_BT, axis=1, dtype=jnp.int32)


def _cudnn_packed(q_BTKGE, k_BSKE, v_BSKE, causal, starts_BR, lengths_BM):
  """cuDNN flash attention over packed runs (jax's `fused_attention_stablehlo`, which
  `jax.nn.dot_product_attention` wraps without exposing its segment offsets): each run attends
  only to itself, causally from its own start. K/V are repeated to one per query head: before
  jax 0.11.1 the key offsets are strided by the query heads (wrong under GQA)."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  b, t, k, g, e = q_BTKGE.shape
  k_BSQE, v_BSQE = (jnp.repeat(x, g, axis=2) for x in (k_BSKE, v_BSKE))
  mask_type = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
  out_BTQE = fa.dot_product_attention(
      q_BTKGE.reshape(b, t, k * g, e), k_BSQE, v_BSQE, q_seqlen=lengths_BM, kv_seqlen=lengths_BM,
      q_offsets=starts_BR, kv_offsets=starts_BR, scale=e**-0.5, mask_type=mask_type)
  return out_BTQE.reshape(b, t, k, g, e)


def _packs_segments(device):
  """Whether cuDNN's packed layout runs on `device`: Hopper (compute capability 9.0) or later."""
  capability = str(getattr(device, "compute_capability", "0"))
  return int(capability.split(".")[0]) >= 9


def _attend_cudnn(q_BTKGE, k_BSKE, v_BSKE, causal, span):
  """cuDNN flash attention. Packed rows (segment ids, no left padding, as many keys as queries)
  go through cuDNN's segment offsets on Hopper and later, with no (T, S) mask, when no row has
  more than PACKED_MAX_SEGMENTS runs of equal ids; a batch with such a row takes the dense-mask
  call (`lax.cond`, decided per batch), as do older GPUs."""
  seg_BT = span.segment_ids_BT
  if (seg_BT is None or span.left_padded or k_BSKE.shape[1] != q_BTKGE.shape[1]
      or not _packs_segments(jax.devices()[0])):
    return _attend_dot_product(q_BTKGE, k_BSKE, v_BSKE, causal, span, "cudnn")
  starts_BR, lengths_BM, count_B = segment_runs(seg_BT, PACKED_MAX_SEGMENTS)
  return jax.lax.cond(
      jnp.max(count_B) <= PACKED_MAX_SEGMENTS,
      lambda q, k, v: _cudnn_packed(q, k, v, causal, starts_BR, lengths_BM),
      lambda q, k, v: _attend_dot_product(q, k, v, causal, span, "cudnn"),
      q_BTKGE, k_BSKE, v_BSKE)


def _kernel_segment_ids(span, t):
  """(B, T) segment ids for the kernels that take them (None: one segment). Left padding
  becomes segment 0, which sees only padding."""
  seg_BT = span.segment_ids_BT
  if span.left_padded:
    real_BT = jnp.arange(t)[None, :] >= span.start_B[:, None]
    seg_BT = jnp.where(real_BT, 1 if seg_BT is None else seg_BT, 0)
  return seg_BT


def _shard_rows(rows, q_BTKGE, k_BSKE, v_BSKE, seg_BT):
  """`rows(q, k, v, seg)` (a Pallas kernel's call) under shard_map over the batch's and the
  kv heads' mesh axes when a mesh is set (a pallas_call cannot be partitioned by XLA)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return rows(q_BTKGE, k_BSKE, v_BSKE, seg_BT)
  from jax.sharding import PartitionSpec as P

  from ftjax.sharding import LOGICAL_RULES  # the same rules as the activations
  rules = dict(LOGICAL_RULES)
  batch, heads = rules["batch"], rules["kv_heads"]
  spec_qkv, spec_seg = P(batch, None, heads), P(batch, None)
  return jax.shard_map(rows, mesh=mesh, in_specs=(spec_qkv, spec_qkv, spec_qkv,
                                                  None if seg_BT is None else spec_seg),
                       out_specs=spec_qkv, check_vma=False)(q_BTKGE, k_BSKE, v_BSKE, seg_BT)


def _attend_pallas(q_BTKGE, k_BSKE, v_BSKE, causal, span, interpret=False):
  """The Pallas (Triton) flash-attention kernel for GPUs (`jax.experimental.pallas.ops.gpu.
  attention.mha`): segment ids are compared inside the kernel (no (T, S) mask); it has no GQA,
  so K/V are repeated to one per query head."""
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention
  b, t, k, g, e = q_BTKGE.shape
  if k_BSKE.shape[1] != t:
    raise ValueError("pallas attention needs as many keys as queries (no decoding)")
  fwd, bwd = min(128, t), min(64, t)
  blocks = pallas_attention.BlockSizes(block_q=fwd, block_k=bwd, block_q_dkv=bwd,
                                       block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd)

  def rows(q_BTKGE, k_BSKE, v_BSKE, seg_BT):
    bb, _, kk = q_BTKGE.shape[:3]
    k_BSQE, v_BSQE = (jnp.repeat(x, g, axis=2) for x in (k_BSKE, v_BSKE))
    out_BTQE = pallas_attention.mha(q_BTKGE.reshape(bb, t, kk * g, e), k_BSQE, v_BSQE, seg_BT,
                                    sm_scale=e**-0.5, causal=causal, block_sizes=blocks,
                                    interpret=interpret)
    return out_BTQE.reshape(bb, t, kk, g, e)

  return _shard_rows(rows, q_BTKGE, k_BSKE, v_BSKE, _kernel_segment_ids(span, t))


def _splash_kernel(t, g, causal, interpret):
  """The Pallas splash-attention kernel for one (batch row, kv head): G query heads, T = S."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  block = min(512, t)
  if t % block:
    raise ValueError(f"splash attention needs the sequence length to be a multiple of {block}, "
                     f"got {t}")
  head_mask = sm.CausalMask((t, t)) if causal else sm.FullMask((t, t))
  sizes = sk.BlockSizes(block_q=block, block_kv_compute=block, block_kv=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                        block_kv_dq=block)
  kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([head_mask] * g),
                                            block_sizes=sizes, interpret=interpret)
  return kernel, sk.SegmentIds


def _attend_splash(q_BTKGE, k_BSKE, v_BSKE, causal, span, interpret=False):
  """TPU splash attention (Pallas): one multi-query kernel call per batch row and kv head, under
  shard_map over the batch's and the heads' mesh axes when a mesh is set. Packing and left
  padding become segment ids (padding is segment 0 and sees only padding)."""
  b, t, k, g, e = q_BTKGE.shape
  if k_BSKE.shape[1] != t:
    raise ValueError("splash attention needs as many keys as queries (no decoding)")
  kernel, segment_ids = _splash_kernel(t, g, causal, interpret)

  def rows(q_BTKGE, k_BSKE, v_BSKE, seg_BT):
    q_BKGTE = jnp.transpose(q_BTKGE * e**-0.5, (0, 2, 3, 1, 4)).astype(k_BSKE.dtype)
    k_BKSE, v_BKSE = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k_BSKE, v_BSKE))

    def row(q_KGTE, k_KSE, v_KSE, seg_T):
      ids = None if seg_T is None else segment_ids(q=seg_T, kv=seg_T)
      return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_KGTE, k_KSE, v_KSE)

    out_BKGTE = jax.vmap(row)(q_BKGTE, k_BKSE, v_BKSE, seg_BT)
    return jnp.transpose(out_BKGTE, (0, 3, 1, 2, 4))

  return _shard_rows(rows, q_BTKGE, k_BSKE, v_BSKE, _kernel_segment_ids(span, t))


def attend(q_BTKGE, k_BSKE, v_BSKE, *, causal, q_chunk=0, span=None, impl="xla"):
  """Grouped-query attention; G query heads share each of the K key/value heads.

  `impl`: "xla" (the einsum form, optionally query-chunked: see `_attend_xla`), "cudnn" (cuDNN
  flash attention; packed rows through its segment offsets, see `_attend_cudnn`), "cudnn_mask"
  (cuDNN with a dense (B, 1, T, S) mask for packed rows), "pallas" (the Pallas GPU flash kernel
  with segment ids), "splash" (the TPU Pallas kernel), or, to test those anywhere,
  "dot_product_xla" (the cuDNN call with XLA's implementation), "pallas_interpret" and
  "splash_interpret" (the Pallas kernels interpreted). `span` (default: the whole buffer) places
  the queries and masks padding and other documents.
  """
  span = Span.full(q_BTKGE.shape[0]) if span is None else span
  if impl == "xla":
    return _attend_xla(q_BTKGE, k_BSKE, v_BSKE, causal, q_chunk, span)
  if impl == "cudnn":
    return _attend_cudnn(q_BTKGE, k_BSKE, v_BSKE, causal, span)
  if impl in ("cudnn_mask", "dot_product_xla"):
    return _attend_dot_product(q_BTKGE, k_BSKE, v_BSKE, causal, span,
                               "cudnn" if impl == "cudnn_mask" else "xla")
  if impl in ("pallas", "pallas_interpret"):
    return _attend_pallas(q_BTKGE, k_BSKE, v_BSKE, causal, span, impl == "pallas_interpret")
  if impl in ("splash", "splash_interpret"):
    return _attend_splash(q_BTKGE, k_BSKE, v_BSKE, causal, span, impl == "splash_interpret")
  raise ValueError(f"unknown attention implementation {impl!r}")


class Attention(nn.Module):
  """Grouped-query attention; queries from `xq_BTD`, keys and values from `xkv_BSD`.

  Three uses: causal self-attention (decoder blocks), full attention with queries from the
  learned constant ζ (the encoder block), and causal attention whose keys/values see X + R
  (the block after the latent).
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  use_rope: bool = True
  dtype: Dtype = jnp.float32
  q_chunk: int = 0  # > 0: attend this many queries at a time (see `attend`)
  decode: bool = False  # keys/values go to a pre-allocated cache (collection "cache")
  impl: str = "xla"  # a resolved attention implementation (see `attend`); decoding uses "xla"
  rope_scaling: Any = None  # Llama 3 RoPE rescaling (see `rope_frequencies`); None: off
  fp8: bool = False  # the four projections in FP8

  @nn.compact
  def __call__(self, xq_BTD, xkv_BSD, span, *, causal):
    d, n, k, e = xq_BTD.shape[-1], self.num_heads, self.num_kv_heads, self.head_dim
    dense = lambda name, eq, shape, axes, n_in=1: Einsum(eq, shape, axes, n_in, self.dtype,
                                                          name=name, fp8=self.fp8)
    q_BTQE = dense("query", "btd,dqe->btqe", (d, n, e), ("embed", "heads", "head_dim"))(xq_BTD)
    k_BSKE = dense("key", "bsd,dke->bske", (d, k, e), ("embed", "kv_heads", "head_dim"))(xkv_BSD)
    v_BSKE = dense("value", "bsd,dke->bske", (d, k, e), ("embed", "kv_heads", "head_dim"))(xkv_BSD)
    b, t = q_BTQE.shape[:2]
    if self.use_rope:
      positions_BT = span.positions(t)
      q_BTQE = rope(q_BTQE, positions_BT, self.rope_theta, self.rope_scaling)
      k_BSKE = rope(k_BSKE, positions_BT, self.rope_theta, self.rope_scaling)
    if self.decode:  # the cache's length is the length of the call that created it
      k_cache = self.variable("cache", "cached_key", jnp.zeros, k_BSKE.shape, k_BSKE.dtype)
      v_cache = self.variable("cache", "cached_value", jnp.zeros, v_BSKE.shape, v_BSKE.dtype)
      where = (0, span.offset, 0, 0)
      k_cache.value = jax.lax.dynamic_update_slice(k_cache.value, k_BSKE, where)
      v_cache.value = jax.lax.dynamic_update_slice(v_cache.value, v_BSKE, where)
      k_BSKE, v_BSKE = k_cache.value, v_cache.value
    q_BTKGE = q_BTQE.reshape(b, t, k, n // k, e)
    out_BTKGE = attend(q_BTKGE, k_BSKE, v_BSKE, causal=causal, q_chunk=self.q_chunk, span=span,
                       impl="xla" if self.decode else self.impl)
    out_BTQE = out_BTKGE.reshape(b, t, n, e).astype(self.dtype)
    return dense("out", "btqe,qed->btd", (n, e, d), ("heads", "head_dim", "embed"), 2)(out_BTQE)


class SwiGLU(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32
  fp8: bool = False  # the three matmuls in FP8

  @nn.compact
  def __call__(self, x_BTD):
    d, f = x_BTD.shape[-1], self.mlp_dim
    dense = lambda name, eq, shape, axes: Einsum(eq, shape, axes, 1, self.dtype, name=name,
                                                 fp8=self.fp8)
    gate_BTF = dense("gate", "btd,df->btf", (d, f), ("embed", "mlp"))(x_BTD)
    up_BTF = dense("up", "btd,df->btf", (d, f), ("embed", "mlp"))(x_BTD)
    return dense("down", "btf,fd->btd", (f, d), ("mlp", "embed"))(nn.silu(gate_BTF) * up_BTF)


def rope_scaling_args(m):
  """The `rope_scaling` tuple of a model config (None without model.rope_scaling or its type
  "none"; configs saved before the key existed have none)."""
  r = m.get("rope_scaling")
  if r is None or r.type == "none":
    return None
  return (r.factor, r.low_freq_factor, r.high_freq_factor, r.original_max_position_embeddings)


class Block(nn.Module):
  """Pre-norm block: x + attn(norm(x) | norm(kv)), then x + mlp(norm(x)).

  `kv_extra_BTD` (the latent's R) is added to the key/value input, before the attention norm
  when `add_before_norm`, after it otherwise; the residual stream itself is unchanged.
  `kv_BSD`, when given, replaces x as the key/value source (the encoder block: x is ζ).
  """
  cfg: Any  # the resolved model config
  causal: bool = True
  use_rope: bool = True
  decode: bool = False
  matmul_dtype: Optional[str] = None  # None: the config's model.matmul_dtype (encoder: "default")

  @nn.compact
  def __call__(self, x_BTD, span, kv_BSD=None, kv_extra_BTD=None):
    m = self.cfg
    dtype = jnp.dtype(m.dtype)
    norm = RMSNorm(m.norm_eps, dtype, name="attn_norm")
    kv_in = x_BTD if kv_BSD is None else kv_BSD
    add_before = m.latent.add_before_norm
    if kv_extra_BTD is not None and add_before:
      kv_in = kv_in + kv_extra_BTD
    h_BTD, hkv_BSD = norm(x_BTD), norm(kv_in)
    if kv_extra_BTD is not None and not add_before:
      hkv_BSD = hkv_BSD + kv_extra_BTD.astype(dtype)
    impl = resolve_attention_impl(m.attention_impl, dtype, m.head_dim)
    use_fp8 = (self.matmul_dtype or m.get("matmul_dtype", "default")) == "fp8"
    attn = Attention(m.num_heads, m.num_kv_heads, m.head_dim, m.rope_theta, self.use_rope, dtype,
                     m.attention_q_chunk, self.decode, impl, name="attn",
                     rope_scaling=rope_scaling_args(m), fp8=use_fp8)
    x_BTD = x_BTD + attn(h_BTD, hkv_BSD, span, causal=self.causal).astype(x_BTD.dtype)
    mlp_in = RMSNorm(m.norm_eps, dtype, name="mlp_norm")(x_BTD)
    x_BTD = x_BTD + SwiGLU(m.mlp_dim, dtype, name="mlp", fp8=use_fp8)(mlp_in).astype(x_BTD.dtype)
    return nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
