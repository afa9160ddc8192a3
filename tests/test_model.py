"""The Transformer: causality, the non-causal encoder, baseline equivalence, CE and remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import losses
from ftjax.model import make_model
from ftjax.train import init_params
from tests.conftest import resolved


def _tokens(cfg, seed=0, batch=2):
  return jax.random.randint(jax.random.key(seed), (batch, cfg.model.seq_len), 3, cfg.model.vocab_size)


def _randomise_post_sampler(params, seed=1):
  """The post-sampler starts at zero; give it values so that Z changes the output."""
  w = params["latent"]["post_sampler"]
  return {**params, "latent": {**params["latent"],
                               "post_sampler": jax.random.normal(jax.random.key(seed), w.shape)}}


def test_decoder_is_causal_for_fixed_codes(tiny_cfg):
  model = make_model(tiny_cfg.model)
  params = _randomise_post_sampler(init_params(model, 0))
  tokens = _tokens(tiny_cfg)
  codes = jax.random.randint(jax.random.key(2), tokens.shape, 0, 2**tiny_cfg.model.latent.num_bits)
  t = 30
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 5) % tiny_cfg.model.vocab_size)
  codes_changed = codes.at[:, t + 1:].set((codes[:, t + 1:] + 1) % 16)
  a, _ = model.apply({"params": params}, tokens, z_mode="given", codes_BT=codes)
  b, _ = model.apply({"params": params}, changed, z_mode="given", codes_BT=codes_changed)
  np.testing.assert_array_equal(a[:, :t + 1], b[:, :t + 1])
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


def test_codes_change_the_output(tiny_cfg):
  model = make_model(tiny_cfg.model)
  params = _randomise_post_sampler(init_params(model, 0))
  tokens = _tokens(tiny_cfg)
  a, _ = model.apply({"params": params}, tokens, z_mode="given", codes_BT=jnp.zeros_like(tokens))
  b, _ = model.apply({"params": params}, tokens, z_mode="given", codes_BT=jnp.ones_like(tokens))
  assert not np.allclose(a, b)


def test_encoder_is_not_causal(tiny_cfg):
  model = make_model(tiny_cfg.model)
  params = init_params(model, 0)
  tokens = _tokens(tiny_cfg)
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % tiny_cfg.model.vocab_size)
  key = jax.random.key(3)
  _, aux_a = model.apply({"params": params}, tokens, z_mode="encoder", latent_key=key)
  _, aux_b = model.apply({"params": params}, changed, z_mode="encoder", latent_key=key)
  # Z_0's logits depend on the last token.
  assert not np.allclose(aux_a["latent_logits_BTH"][:, 0], aux_b["latent_logits_BTH"][:, 0])


def test_baseline_equals_ft_with_latent_disabled_or_zero(tiny_cfg):
  ft_model = make_model(tiny_cfg.model)
  base_cfg = resolved(tiny_cfg, **{"model.latent.enabled": False})
  base_model = make_model(base_cfg.model)
  ft_params, base_params = init_params(ft_model, 0), init_params(base_model, 0)
  assert set(ft_params) - set(base_params) == {"latent"}
  shared = {k: v for k, v in ft_params.items() if k != "latent"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, shared, base_params)

  tokens = _tokens(tiny_cfg)
  base_logits, _ = base_model.apply({"params": base_params}, tokens)
  # R forced to zero, encoder ignored:
  zero_logits, _ = ft_model.apply({"params": _randomise_post_sampler(ft_params)}, tokens,
                                  z_mode="zero")
  np.testing.assert_array_equal(zero_logits, base_logits)
  # The zero-initialised post-sampler makes the fresh FT compute the baseline:
  enc_logits, aux = ft_model.apply({"params": ft_params}, tokens, z_mode="encoder",
                                   latent_key=jax.random.key(0))
  np.testing.assert_allclose(enc_logits, base_logits, rtol=1e-6, atol=1e-6)
  assert aux["kl_BT"].shape == tokens.shape


@pytest.mark.parametrize("post_sampler", ["onehot", "bits"])
@pytest.mark.parametrize("add_before_norm", [True, False])
def test_latent_variants_run_and_use_z(tiny_cfg, post_sampler, add_before_norm):
  cfg = resolved(tiny_cfg, **{"model.latent.post_sampler": post_sampler,
                              "model.latent.add_before_norm": add_before_norm,
                              "model.latent.zero_init_post_sampler": False})
  model = make_model(cfg.model)
  params = init_params(model, 0)
  tokens = _tokens(cfg)
  a, _ = model.apply({"params": params}, tokens, z_mode="uniform", latent_key=jax.random.key(1))
  b, _ = model.apply({"params": params}, tokens, z_mode="uniform", latent_key=jax.random.key(2))
  assert a.shape == (*tokens.shape, cfg.model.vocab_size) and not np.allclose(a, b)


@pytest.mark.parametrize("inject_layer", [0, 1, 3])
def test_injection_point(tiny_cfg, inject_layer):
  cfg = resolved(tiny_cfg, **{"model.num_layers": 4, "model.latent.inject_layer": inject_layer})
  model = make_model(cfg.model)
  params = init_params(model, 0)
  stacked = {"layers_lo": inject_layer, "layers_hi": 4 - inject_layer - 1}
  for name, length in stacked.items():
    if length:
      leaf = jax.tree_util.tree_leaves(params[name])[0]
      assert leaf.shape[0] == length  # stacked along the leading `layers` axis
    else:
      assert name not in params
  logits, _ = model.apply({"params": params}, _tokens(cfg), z_mode="encoder",
                          latent_key=jax.random.key(0))
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_parameters_carry_logical_axis_names(tiny_cfg):
  import flax.linen as nn
  model = make_model(tiny_cfg.model)
  variables = model.init(jax.random.key(0), _tokens(tiny_cfg), latent_key=jax.random.key(0))
  specs = nn.get_partition_spec(variables)["params"]
  leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert all(isinstance(s, jax.sharding.PartitionSpec) and len(s) > 0 for s in leaves)
  assert tuple(specs["latent"]["post_sampler"]) == ("codes", "embed")
  assert tuple(specs["embed"]) == ("vocab", "embed")
  assert tuple(specs["layers_lo"]["block"]["attn"]["query"]["kernel"]) == (
      "layers", "embed", "heads", "head_dim")


@pytest.mark.parametrize("chunk", [7, 32, 200])
def test_chunked_cross_entropy_matches_plain(chunk):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (3, 21, 16))
  w = jax.random.normal(k2, (16, 50))
  targets = jax.random.randint(k3, (3, 21), 0, 50)
  plain = lambda x, w: jnp.mean(losses.cross_entropy(x, w, targets))
  chunked = lambda x, w: jnp.mean(losses.cross_entropy(x, w, targets, chunk_tokens=chunk))
  logits = jnp.einsum("btd,dv->btv", x, w)
  naive = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(losses.cross_entropy(x, w, targets, chunk_tokens=chunk), naive,
                             rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.grad(chunked, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_free_bits_kl_is_a_per_token_hinge():
  kl = jnp.array([[0.1, 0.5, 2.0], [0.0, 1.0, 0.3]])
  expected = np.mean(np.maximum(np.asarray(kl) - 0.3, 0))
  np.testing.assert_allclose(jnp.mean(losses.free_bits_kl_BT(kl, 0.3)), expected, rtol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "nothing"])
def test_remat_policies_give_the_same_gradients(tiny_cfg, policy):
  from ftjax.train import accumulated_grads
  grads = []
  for p in ("none", policy):
    cfg = resolved(tiny_cfg, **{"model.remat_policy": p})
    model = make_model(cfg.model)
    params = init_params(model, 0)
    tokens = _tokens(cfg)
    batch = {"inputs": tokens, "targets": tokens}
    grads.append(accumulated_grads(params, batch, jax.random.key(0), model, 1)[0])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         *grads)


def test_bfloat16_compute_keeps_float32_params(tiny_cfg):
  cfg = resolved(tiny_cfg, **{"model.dtype": "bfloat16"})
  model = make_model(cfg.model)
  params = init_params(model, 0)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  logits, aux = model.apply({"params": params}, _tokens(cfg), latent_key=jax.random.key(0))
  assert bool(jnp.all(jnp.isfinite(logits))) and bool(jnp.all(jnp.isfinite(aux["kl_BT"])))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_chunk", [8, 13])
def test_chunked_attention_matches_dense(causal, q_chunk):
  from ftjax.layers import attend
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(k1, (2, 40, 2, 3, 8))  # B T K G E
  k = jax.random.normal(k2, (2, 40, 2, 8))
  v = jax.random.normal(k3, (2, 40, 2, 8))
  cot = jax.random.normal(k4, q.shape)
  dense = lambda q, k, v: jnp.sum(attend(q, k, v, causal=causal) * cot)
  chunked = lambda q, k, v: jnp.sum(attend(q, k, v, causal=causal, q_chunk=q_chunk) * cot)
  np.testing.assert_allclose(attend(q, k, v, causal=causal, q_chunk=q_chunk),
                             attend(q, k, v, causal=causal), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.grad(chunked, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
