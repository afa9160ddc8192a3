"""The GPU training paths, checked where a CPU can: the Pallas GPU flash kernel (interpreted)
and cuDNN's packed layout (the runs it is given; the kernel itself needs a GPU, see
benchmarks/gpu_check.py) on packed rows, and FP8 matmuls (emulated: the same quantisation, no
FP8 hardware)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import fp8, layers, train
from ftjax.data import make_source
from ftjax.errors import ConfigError
from ftjax.trainer import Trainer
from tests.conftest import resolved


def _packed_span(b, t):
  """Two packed rows: three documents then padding, and two documents."""
  seg_BT = np.zeros((b, t), np.int32)
  seg_BT[0, :40], seg_BT[0, 40:41], seg_BT[0, 41:100] = 1, 2, 3
  seg_BT[1, :70], seg_BT[1, 70:] = 1, 2
  return layers.Span(jnp.zeros((), jnp.int32), jnp.zeros((b,), jnp.int32),
                     segment_ids_BT=jnp.asarray(seg_BT), left_padded=False)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_pallas_gpu_kernel_interpreted_equals_xla_on_packed_rows(causal):
  b, t, k, g, e = 2, 128, 2, 2, 16  # two backward blocks of 64 keys: segments cross blocks
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, t, k, g, e))
  kv = [jax.random.normal(x, (b, t, k, e)) for x in keys[1:]]
  span = _packed_span(b, t)
  loss = lambda impl: lambda *qkv: jnp.sum(jnp.sin(layers.attend(*qkv, causal=causal, span=span,
                                                                 impl=impl)))
  for impl, tol in (("xla", 0), ("pallas_interpret", 1e-4)):
    out = jax.jit(functools.partial(layers.attend, causal=causal, span=span, impl=impl))(q, *kv)
    grads = jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, *kv)
    if impl == "xla":
      ref_out, ref_grads = out, grads
      continue
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
    for a, r in zip(grads, ref_grads):
      np.testing.assert_allclose(a, r, rtol=1e-3, atol=tol)


def test_segment_runs_are_cudnns_packed_layout():
  seg_BT = jnp.array([[1, 1, 2, 2, 2, 3, 0, 0], [1] * 8, [1, 2, 3, 4, 5, 6, 7, 8]])
  starts_BR, lengths_BM, count_B = layers.segment_runs(seg_BT, max_runs=4)
  np.testing.assert_array_equal(count_B, [4, 1, 8])
  np.testing.assert_array_equal(starts_BR[:2], [[0, 2, 5, 6, -1], [0, -1, -1, -1, -1]])
  np.testing.assert_array_equal(lengths_BM[:2], [[2, 3, 1, 2], [8, -1, -1, -1]])
  assert int(count_B.max()) > 4  # the third row takes the dense-mask path on a GPU


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_rows_lower_to_cudnns_packed_kernel(monkeypatch, causal):
  """Lowered for CUDA (no GPU needed; jax's cuDNN version and capability checks stubbed as on a
  Hopper): the packed call carries the runs (max 64 per row) and cuDNN's padding masks, and the
  dense-mask call is the other branch of the per-batch cond."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda capability: False)
  monkeypatch.setattr(layers, "_packs_segments", lambda device: True)
  b, t, k, g, e = 2, 128, 2, 2, 64
  q, kv = jnp.zeros((b, t, k, g, e), jnp.bfloat16), jnp.zeros((b, t, k, e), jnp.bfloat16)
  span = _packed_span(b, t)
  loss = lambda *qkv: jnp.sum(layers.attend(*qkv, causal=causal, span=span, impl="cudnn"))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(
      lowering_platforms=("cuda",)).as_text().replace("\\22", '"')
  packed = [line for line in text.splitlines() if "custom_call @__cudnn$fmhaSoftmax" in line]
  assert len(packed) == 2 and all('"max_seg_per_batch": 64' in line for line in packed)  # fwd, bwd
  mask = "PADDING_CAUSAL" if causal else "PADDING"
  assert all(f'"mask_type": "{mask}"' in line for line in packed)
  assert text.count("custom_call @__cudnn$fmhaScaleBiasSoftmax") == 2  # the dense-mask branch


def test_gpu_kernels_are_config_errors_elsewhere(tiny_cfg):
  for impl in ("cudnn_mask", "pallas"):
    with pytest.raises(ConfigError, match="needs a GPU"):
      Trainer.create(resolved(tiny_cfg, **{"model.attention_impl": impl}))


def test_fp8_rounding_and_gradients():
  x = jnp.array([0.1, -0.7, 3.0, -448.0 * 3, 1e-3])
  y = fp8.qdq(x, fp8.E4M3, jnp.float32)
  assert jnp.max(jnp.abs(y - x)[:4] / jnp.abs(x[:4])) < 2**-4  # 3 mantissa bits
  assert y[3] == x[3] and y[4] == 0  # the amax maps to e4m3's max; 2^-20 of it underflows
  w = jnp.array([[0.3, -1.1], [2.0, 0.05]])
  f = lambda x, w: jnp.sum(fp8.einsum("i,ij->j", x[:2], w, jnp.float32) * jnp.array([1.0, 1e-3]))
  gx, gw = jax.grad(f, argnums=(0, 1))(x, w)
  # the output gradient (1, 1e-3) is e5m2-rounded; x and w pass it straight through (as qdq'd)
  np.testing.assert_allclose(gw[:, 1] / gw[:, 0], 1e-3, rtol=2**-2)
  assert gx.dtype == x.dtype and gw.dtype == w.dtype


def test_fp8_config_errors(tiny_cfg):
  with pytest.raises(ConfigError, match="model.matmul_dtype: fp8 needs model.dtype"):
    resolved(tiny_cfg, **{"model.matmul_dtype": "fp8"})
  with pytest.raises(ConfigError, match="model.matmul_dtype: must be one of"):
    resolved(tiny_cfg, **{"model.matmul_dtype": "fp4"})
  cfg = resolved(tiny_cfg, **{"model.matmul_dtype": "fp8", "model.dtype": "bfloat16"})
  with pytest.raises(ConfigError, match="fp8 needs FP8 matmuls .* device is cpu"):
    Trainer.create(cfg)


def _loss_curve(cfg, steps):
  """Losses of `steps` train steps of `cfg` on the synthetic task (emulated on a CPU: no
  Trainer, which refuses FP8 without the hardware)."""
  model = train.make_model(cfg.model)
  step = jax.jit(functools.partial(
      train.train_step, model=model, optimizer=train.make_optimizer(cfg.train),
      schedule=train.lr_schedule(cfg.train), seed=cfg.seed))
  state = train.init_train_state(cfg, model)
  stream = make_source(cfg).stream("train", cfg.train.batch_size, slice(None), 0, 1)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, {k: jnp.asarray(v) for k, v in next(stream).items()})
    losses.append(float(metrics["ce"]))
  return np.array(losses)


def test_fp8_loss_curve_follows_bfloat16(tiny_cfg):
  """50 steps of the tiny FT: the FP8 decoder's CE is within 5% of bfloat16's at every step and
  within 2% over the last 10 steps (measured: 2.6% at most, at step 3 of the steep descent; 0.3%
  over the last 10), and both learn."""
  base = {"model.dtype": "bfloat16", "train.steps": 50}
  bf16 = _loss_curve(resolved(tiny_cfg, **base), 50)
  f8 = _loss_curve(resolved(tiny_cfg, **base, **{"model.matmul_dtype": "fp8"}), 50)
  assert bf16[-1] < 0.8 * bf16[0] and f8[-1] < 0.8 * f8[0]
  np.testing.assert_allclose(f8, bf16, rtol=0.05)
  np.testing.assert_allclose(f8[-10:].mean(), bf16[-10:].mean(), rtol=0.02)
