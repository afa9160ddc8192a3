"""Sharded training on the fake 8-device CPU mesh matches one device; placement follows the rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ftjax import sharding
from ftjax.errors import ConfigError
from ftjax.trainer import Trainer
from tests.conftest import resolved

MESHES = {"data2_fsdp2_tensor2": (2, 2, 2), "fsdp8": (1, 8, 1)}


def _run(cfg, steps=3):
  trainer = Trainer.create(cfg)
  state = trainer.init_state()
  losses = []
  for step in range(steps):
    state, m = trainer.train_step(state, trainer.batch(step))
    losses.append(float(m["loss"]))
  return jax.device_get(state.params), losses, trainer


def _mesh_overrides(shape):
  return {"mesh.data": shape[0], "mesh.fsdp": shape[1], "mesh.tensor": shape[2]}


@pytest.mark.parametrize("latent", [True, False], ids=["ft", "baseline"])
@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_steps_match_single_device(tiny_cfg, mesh, latent):
  base = {"train.batch_size": 8, "model.latent.enabled": latent}
  single_params, single_losses, _ = _run(resolved(tiny_cfg, **base))
  params, losses, trainer = _run(resolved(tiny_cfg, **base, **_mesh_overrides(MESHES[mesh])))
  assert trainer.mesh.devices.size == 8
  np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         params, single_params)


def test_parameter_placement_follows_the_rules(tiny_cfg):
  cfg = resolved(tiny_cfg, **{"train.batch_size": 8, **_mesh_overrides((2, 2, 2))})
  trainer = Trainer.create(cfg)
  state = trainer.init_state()
  specs = jax.tree_util.tree_map(lambda x: x.sharding.spec, state.params)
  assert specs["latent"]["post_sampler"] == P("tensor", "fsdp")  # codes x embed
  assert specs["embed"] == P("tensor", "fsdp")  # vocab x embed
  assert specs["unembed"]["kernel"] == P("fsdp", "tensor")
  assert specs["layers_lo"]["block"]["mlp"]["up"]["kernel"] == P(None, "fsdp", "tensor")
  mu = state.opt_state[1][0].mu  # Adam moments are placed like their parameters
  assert mu["latent"]["post_sampler"].sharding.spec == P("tensor", "fsdp")
  abstract = jax.eval_shape(lambda: state.params)
  assert sharding.replicated_fraction(abstract, trainer.state_sharding.params) < 0.05


def test_mesh_must_divide_the_devices():
  with pytest.raises(ConfigError, match="does not divide the 8 devices"):
    sharding.mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
  with pytest.raises(ConfigError, match="do not divide"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding.mesh_shape({"data": 2, "fsdp": 1, "tensor": 1}, 8) == (2, 1, 1)


def test_batch_must_split_over_the_mesh(tiny_cfg):
  cfg = resolved(tiny_cfg, **_mesh_overrides((1, 8, 1)))  # batch 4 over 8 devices
  with pytest.raises(ConfigError, match="train.batch_size"):
    Trainer.create(cfg)


def test_too_much_replication_is_a_config_error(tiny_cfg):
  # With only the data axis, every parameter is replicated on the 8 devices.
  cfg = resolved(tiny_cfg, **{"mesh.data": 8, "train.batch_size": 8,
                              "mesh.max_replicated_fraction": 0.05})
  with pytest.raises(ConfigError, match="100.0% of the parameter bytes are replicated"):
    Trainer.create(cfg)
  Trainer.create(resolved(cfg, **{"mesh.max_replicated_fraction": 1.0}))
