"""KV-cache decoding against full forward passes, and the ways of choosing Z."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import sampling
from ftjax.model import make_model
from ftjax.train import init_params
from tests.conftest import resolved

PROMPTS = [[1, 10, 5, 7, 9, 12], [1, 20, 5], [1, 8, 5, 11]]  # mixed lengths


def _setup(tiny_cfg, latent=True):
  cfg = resolved(tiny_cfg, **{"model.latent.enabled": latent,
                              "model.latent.zero_init_post_sampler": False})
  params = init_params(make_model(cfg.model), 0)
  return cfg, params, make_model(cfg.model), make_model(cfg.model, decode=True)


@pytest.mark.parametrize("latent", [True, False], ids=["ft", "baseline"])
def test_cached_logits_equal_full_forward(tiny_cfg, latent):
  cfg, params, model, decode_model = _setup(tiny_cfg, latent)
  prompt_BP, start_B = sampling.left_pad(PROMPTS)
  out = sampling.generate(decode_model, params, jnp.asarray(prompt_BP), jnp.asarray(start_B),
                          jax.random.key(0), max_new_tokens=8, return_logits=True)
  tokens_BT = out["tokens"]
  kwargs = {"z_mode": "given", "codes_BT": out["codes"]} if latent else {"z_mode": "zero"}
  full_BTV, _ = model.apply({"params": params}, tokens_BT, start_B=jnp.asarray(start_B), **kwargs)
  p = prompt_BP.shape[1]
  np.testing.assert_allclose(out["logits"], full_BTV[:, p - 1:-1], rtol=1e-4, atol=1e-4)


def test_left_pad_to_the_longest_or_a_given_length():
  tokens_BP, start_B = sampling.left_pad(PROMPTS)
  np.testing.assert_array_equal(tokens_BP[1], [0, 0, 0, 1, 20, 5])
  np.testing.assert_array_equal(start_B, [0, 3, 2])
  tokens_BP, start_B = sampling.left_pad(PROMPTS, pad_id=3, length=8)  # the harness's buckets
  np.testing.assert_array_equal(tokens_BP[2], [3, 3, 3, 3, 1, 8, 5, 11])
  np.testing.assert_array_equal(start_B, [2, 5, 4])
  assert tokens_BP.dtype == start_B.dtype == np.int32


def test_left_padding_does_not_change_a_sequence(tiny_cfg):
  cfg, params, model, _ = _setup(tiny_cfg)
  codes = jnp.arange(9)[None] % 16
  alone, _ = model.apply({"params": params}, jnp.asarray([[1, 8, 5, 11]]), z_mode="given",
                         codes_BT=codes[:, 5:])
  padded, _ = model.apply({"params": params}, jnp.asarray([[0] * 5 + [1, 8, 5, 11]]),
                          z_mode="given", codes_BT=codes, start_B=jnp.asarray([5]))
  np.testing.assert_allclose(padded[:, 5:], alone, rtol=1e-5, atol=1e-5)


def test_fixed_mode_is_deterministic_and_uniform_draws_differ(tiny_cfg):
  _, params, _, decode_model = _setup(tiny_cfg)
  prompt_BP, start_B = map(jnp.asarray, sampling.left_pad(PROMPTS))
  run = lambda **kw: sampling.generate(decode_model, params, prompt_BP, start_B,
                                       jax.random.key(3), max_new_tokens=6, **kw)
  a = run(z_mode="fixed", codes_B=jnp.asarray([5, 5, 9]))
  b = run(z_mode="fixed", codes_B=jnp.asarray([5, 5, 9]))
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert (a["codes"][:2] == 5).all() and (a["codes"][2] == 9).all()
  row_of_fives = jnp.broadcast_to(a["codes"][:1], a["codes"].shape)
  per_position = run(z_mode="fixed", fixed_codes_BT=row_of_fives)
  np.testing.assert_array_equal(per_position["tokens"][:2], a["tokens"][:2])  # same codes and key
  assert (per_position["codes"] == 5).all()
  with pytest.raises(ValueError, match=r"fixed_codes_BT must have shape \(3, \d+\)"):
    run(z_mode="fixed", fixed_codes_BT=jnp.zeros((3, 2), jnp.int32))
  uniform = run(z_mode="uniform")["codes"]
  assert len(np.unique(np.asarray(uniform[0]))) > 3  # a fresh code per token


def test_encoder_mode_reproduces_training_codes(tiny_cfg):
  _, params, model, decode_model = _setup(tiny_cfg)
  prompt_BP = jnp.asarray([[1, 10, 5, 7], [1, 20, 5, 9]])
  key = jax.random.key(7)
  out = sampling.generate(decode_model, params, prompt_BP, jnp.zeros(2, jnp.int32), key,
                          max_new_tokens=3, z_mode="encoder", new_z="fixed",
                          codes_B=jnp.asarray([1, 2]))
  _, enc_key, _ = jax.random.split(key, 3)
  _, aux = model.apply({"params": params}, prompt_BP, z_mode="encoder", latent_key=enc_key)
  np.testing.assert_array_equal(out["codes"][:, :4], aux["codes_BT"])
  np.testing.assert_array_equal(out["codes"][:, 4:], [[1] * 3, [2] * 3])


def test_sampling_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  np.testing.assert_array_equal(jnp.isfinite(sampling.filter_logits(logits, top_k=2)),
                                [[True, True, False, False]])
  np.testing.assert_array_equal(jnp.isfinite(sampling.filter_logits(logits, top_p=0.7)),
                                [[True, True, False, False]])
  np.testing.assert_array_equal(jnp.isfinite(sampling.filter_logits(logits, top_p=0.5)),
                                [[True, False, False, False]])
  assert int(sampling.sample_token(None, logits, temperature=0)[0]) == 0
  draws = jax.vmap(lambda k: sampling.sample_token(k, logits, top_k=2))(
      jax.random.split(jax.random.key(0), 200))
  assert set(np.unique(np.asarray(draws))) == {0, 1}


def test_generation_stops_at_eos(tiny_cfg):
  _, params, _, decode_model = _setup(tiny_cfg, latent=False)
  prompt_BP, start_B = map(jnp.asarray, sampling.left_pad(PROMPTS))
  run = lambda prompt, start, **kw: sampling.generate(
      decode_model, params, prompt, start, jax.random.key(0), temperature=0.0, **kw)
  eos = int(run(prompt_BP, start_B, max_new_tokens=1)["tokens"][0, -1])  # greedy first token
  out = run(prompt_BP, start_B, max_new_tokens=20, eos_id=eos)
  p = prompt_BP.shape[1]
  assert (np.asarray(out["tokens"][0, p:]) == eos).all()  # ended, then padded with eos
  alone = run(prompt_BP[:1], start_B[:1], max_new_tokens=20, eos_id=eos)
  assert int(alone["num_generated"]) == 1  # the loop stops once every sequence has ended


def test_generation_on_a_mesh_matches_one_device(tiny_cfg):
  from ftjax import sharding
  from ftjax.trainer import Trainer
  cfg = resolved(tiny_cfg, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                              "train.batch_size": 8, "model.latent.zero_init_post_sampler": False})
  trainer = Trainer.create(cfg)
  sharded = trainer.init_state().params
  decode_model = make_model(cfg.model, decode=True)
  prompt_BP, start_B = map(jnp.asarray, sampling.left_pad(PROMPTS))
  run = lambda params: sampling.generate(decode_model, params, prompt_BP, start_B,
                                         jax.random.key(0), max_new_tokens=6, temperature=0.0,
                                         return_logits=True)
  with sharding.in_mesh(trainer.mesh):
    on_mesh = run(sharded)
  alone = run(jax.device_get(sharded))
  np.testing.assert_allclose(on_mesh["logits"], alone["logits"], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(on_mesh["codes"], alone["codes"])
