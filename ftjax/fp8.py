"""FP8 matmuls with current scaling (no state): each operand is quantised per tensor with a
scale from its own amax in this step, e4m3 for the inputs and weights of the forward pass, e5m2
for the gradient flowing back into the matmul.

The quantised values are dequantised right before the einsum ("qdq": quantise, dequantise):
XLA's GPU compiler rewrites dot(convert(f8) * scale, convert(f8) * scale) into one FP8 cuBLASLt
matmul that takes the scales, in the forward and both backward matmuls. Elsewhere (a CPU) the
same graph runs in the compute dtype: the numbers are those of FP8, the speed is not.
"""

import functools

import jax
import jax.numpy as jnp

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def qdq(x, q_dtype, out_dtype):
  """`x` rounded to `q_dtype` with the per-tensor scale amax(|x|) / max(q_dtype), returned in
  `out_dtype` (dequantised: the FP8 value times its scale)."""
  fmax = float(jnp.finfo(q_dtype).max)
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  scale = jnp.where(amax > 0, amax / fmax, 1.0)
  q = jnp.clip(x.astype(jnp.float32) / scale, -fmax, fmax).astype(q_dtype)
  return q.astype(out_dtype) * scale.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def quantize_input(x, dtype):
  """e4m3 qdq of a matmul operand, in `dtype`; the gradient passes straight through."""
  return qdq(x, E4M3, dtype)


def _quantize_input_fwd(x, dtype):
  return qdq(x, E4M3, dtype), jnp.zeros((), x.dtype)


def _quantize_input_bwd(dtype, like, g):
  del dtype
  return (g.astype(like.dtype),)


quantize_input.defvjp(_quantize_input_fwd, _quantize_input_bwd)


@jax.custom_vjp
def quantize_grad(y):
  """The identity; its gradient is rounded to e5m2 (per-tensor scale)."""
  return y


def _quantize_grad_fwd(y):
  return y, None


def _quantize_grad_bwd(_, g):
  return (qdq(g, E5M2, g.dtype),)


quantize_grad.defvjp(_quantize_grad_fwd, _quantize_grad_bwd)


def einsum(equation, x, w, dtype):
  """`jnp.einsum(equation, x, w)` in `dtype` with x and w in e4m3 and the gradient of the
  output in e5m2, so that the forward matmul and both backward ones run in FP8."""
  y = jnp.einsum(equation, quantize_input(x, dtype), quantize_input(w, dtype))
  return quantize_grad(y)


def fp8_supported(device):
  """Whether `device` has FP8 matmuls: NVIDIA compute capability 8.9 (Ada) or above."""
  capability = getattr(device, "compute_capability", None)
  if device.platform != "gpu" or capability is None:
    return False
  return tuple(int(p) for p in str(capability).split(".")[:2]) >= (8, 9)
