"""Paper-scale training features: gradient accumulation, attention implementations, packed
documents kept apart, bfloat16 parameters."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import layers, sharding, train
from ftjax.errors import ConfigError
from ftjax.model import make_model
from ftjax.trainer import Trainer
from tests.conftest import resolved


def _steps(cfg, num_steps=3):
  trainer = Trainer.create(cfg)
  state = trainer.init_state()
  for step in range(num_steps):
    state, metrics = trainer.train_step(state, trainer.batch(step))
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("latent", [True, False], ids=["ft", "baseline"])
def test_grad_accumulation_equals_one_big_batch(tiny_cfg, latent):
  base = {"train.batch_size": 16, "model.latent.enabled": latent}
  ref_params, ref_metrics = _steps(resolved(tiny_cfg, **base))
  for mesh in ({"mesh.data": 1}, {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}):
    params, metrics = _steps(resolved(tiny_cfg, **base, **mesh, **{"train.grad_accum_steps": 4}))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           params, ref_params)
    for k in ref_metrics:
      np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_grad_accumulation_must_divide_the_batch(tiny_cfg):
  with pytest.raises(ConfigError, match="train.grad_accum_steps"):
    resolved(tiny_cfg, **{"train.grad_accum_steps": 3})  # batch 4
  cfg = resolved(tiny_cfg, **{"train.batch_size": 8, "train.grad_accum_steps": 4,
                              "mesh.data": 4})
  with pytest.raises(ConfigError, match=r"batch's devices \(4\) × train.grad_accum_steps"):
    Trainer.create(cfg)


def _qkv(key, b=2, t=12, k=2, g=2, e=8):
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, (b, t, k, g, e)), jax.random.normal(kk, (b, t, k, e)),
          jax.random.normal(kv, (b, t, k, e)))


SPANS = {
    "plain": lambda b, t: layers.Span.full(b),
    "left_padded": lambda b, t: layers.Span(jnp.zeros((), jnp.int32), jnp.array([0, 5])),
    "packed": lambda b, t: layers.Span(
        jnp.zeros((), jnp.int32), jnp.zeros((b,), jnp.int32),
        segment_ids_BT=jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12]),
        positions_BT=jnp.array([list(range(5)) + list(range(4)) + [0] * 3, list(range(12))]),
        left_padded=False),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("span", list(SPANS))
def test_attention_implementations_agree(span, causal):
  q, k, v = _qkv(jax.random.key(0))
  sp = SPANS[span](2, 12)

  def out(impl, q_chunk=0):
    f = lambda q, k, v: jnp.sum(jnp.sin(layers.attend(q, k, v, causal=causal, q_chunk=q_chunk,
                                                      span=sp, impl=impl)))
    return layers.attend(q, k, v, causal=causal, q_chunk=q_chunk, span=sp, impl=impl), \
        jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  ref_out, ref_grads = out("xla")
  for impl, chunk in (("dot_product_xla", 0), ("xla", 5)):
    o, grads = out(impl, chunk)
    np.testing.assert_allclose(o, ref_out, rtol=1e-5, atol=1e-5, err_msg=impl)
    for a, b in zip(grads, ref_grads):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("span", list(SPANS))
def test_splash_kernel_interpreted_equals_xla(span, causal):
  """The TPU splash kernel (Pallas, interpreted on CPU), with its GQA, packing and left-padding
  mapping, on one device and under shard_map on a (data, fsdp, tensor) mesh."""
  b, t = 2, 128
  q, k, v = _qkv(jax.random.key(2), b=b, t=t)
  base = SPANS[span](b, 12)
  sp = layers.Span(base.offset, base.start_B,
                   None if base.segment_ids_BT is None else jnp.repeat(base.segment_ids_BT, 11, 1)[:, :t],
                   None, left_padded=base.left_padded)
  real_BT11 = (jnp.arange(t)[None, :] >= sp.start_B[:, None])[:, :, None, None, None]  # not padding
  attend = lambda impl, q, k, v: layers.attend(q, k, v, causal=causal, span=sp, impl=impl) * real_BT11
  ref = attend("xla", q, k, v)
  f = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attend(impl, q, k, v)))
  ref_grads = jax.grad(f("xla"), argnums=(0, 1, 2))(q, k, v)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
  for context in (contextlib.nullcontext(), sharding.in_mesh(mesh)):
    with context:
      out = jax.jit(lambda q, k, v: attend("splash_interpret", q, k, v))(q, k, v)
      grads = jax.jit(jax.grad(f("splash_interpret"), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    for a, b_ in zip(grads, ref_grads):
      np.testing.assert_allclose(a, b_, rtol=1e-3, atol=1e-4)


def test_attention_masks_naive_reference():
  """Packed causal attention equals attention computed on each document alone."""
  q, k, v = _qkv(jax.random.key(1), b=1)
  sp = SPANS["packed"](2, 12)
  sp = layers.Span(sp.offset, sp.start_B[:1], sp.segment_ids_BT[:1], sp.positions_BT[:1], False)
  packed = layers.attend(q, k, v, causal=True, span=sp)
  for lo, hi in ((0, 5), (5, 9)):
    alone = layers.attend(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], causal=True)
    np.testing.assert_allclose(packed[:, lo:hi], alone, rtol=1e-5, atol=1e-6)


def test_unavailable_kernel_is_a_config_error(tiny_cfg):
  for impl, match in (("cudnn", "needs a GPU"), ("splash", "needs a TPU")):
    with pytest.raises(ConfigError, match=match):
      Trainer.create(resolved(tiny_cfg, **{"model.attention_impl": impl}))
  assert layers.resolve_attention_impl("auto", jnp.bfloat16, 64, backend="gpu") == "cudnn"
  assert layers.resolve_attention_impl("auto", jnp.float32, 64, backend="gpu") == "xla"
  assert layers.resolve_attention_impl("auto", jnp.bfloat16, 64, backend="cpu") == "xla"
  assert layers.resolve_attention_impl("auto", jnp.float32, 64, backend="tpu") == "splash"


@pytest.mark.parametrize("latent", [True, False], ids=["ft", "baseline"])
def test_packed_document_scores_as_if_alone(tiny_cfg, latent):
  """A document packed between others gets the logits (and, for the FT, the encoder's
  posterior and given-Z logits) it gets alone in its row."""
  cfg = resolved(tiny_cfg, **{"model.latent.enabled": latent})
  model = make_model(cfg.model)
  params = train.init_params(model, 0)
  params = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.ones_like(x), params)  # post-sampler ≠ 0
  rng = np.random.default_rng(0)
  docs = [rng.integers(1, cfg.model.vocab_size, n) for n in (7, 11, 5)]
  tokens = np.concatenate(docs + [np.zeros(3, int)])[None]
  seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(3)])[None]
  pos = np.concatenate([np.arange(len(d)) for d in docs] + [np.zeros(3)])[None]
  codes = rng.integers(0, 2**cfg.model.latent.num_bits, tokens.shape)
  kw = dict(z_mode="given", codes_BT=jnp.asarray(codes)) if latent else dict(z_mode="zero")
  packed, _ = model.apply({"params": params}, jnp.asarray(tokens), **kw,
                          segment_ids_BT=jnp.asarray(seg, jnp.int32),
                          positions_BT=jnp.asarray(pos, jnp.int32))
  lo = len(docs[0])
  hi = lo + len(docs[1])
  kw_alone = dict(kw, codes_BT=jnp.asarray(codes[:, lo:hi])) if latent else kw
  alone, _ = model.apply({"params": params}, jnp.asarray(docs[1])[None], **kw_alone)
  np.testing.assert_allclose(packed[:, lo:hi], alone, rtol=1e-4, atol=1e-4)
  if latent:  # the non-causal encoder stays inside the document too
    _, aux = model.apply({"params": params}, jnp.asarray(tokens), z_mode="encoder_argmax",
                         segment_ids_BT=jnp.asarray(seg, jnp.int32),
                         positions_BT=jnp.asarray(pos, jnp.int32))
    _, aux_alone = model.apply({"params": params}, jnp.asarray(docs[1])[None],
                               z_mode="encoder_argmax")
    np.testing.assert_allclose(aux["latent_logits_BTH"][:, lo:hi], aux_alone["latent_logits_BTH"],
                               rtol=1e-4, atol=1e-4)


def test_bfloat16_parameters_keep_float32_moments(tiny_cfg):
  cfg = resolved(tiny_cfg, **{"model.param_dtype": "bfloat16", "model.dtype": "bfloat16"})
  trainer = Trainer.create(cfg)
  state = trainer.init_state()
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(state.params))
  mu = state.opt_state[1][0].mu
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(mu))
  state, metrics = trainer.train_step(state, trainer.batch(0))
  assert np.isfinite(float(metrics["loss"]))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(state.params))
