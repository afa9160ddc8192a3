"""Device mesh, logical-axis rules, and the shardings of the train state and batches.

One table, `LOGICAL_RULES`, maps the logical axis names that layers put on parameters and
activations to the mesh axes `data`, `fsdp` and `tensor`. Layers never name mesh axes; changing
the mesh (config `mesh.*`) moves the same model from one device to a pod.
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ftjax.configs import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("codes", "tensor"),  # the 2^H rows of the post-sampler
    ("latent_bits", None),
    ("layers", None),
)


@contextlib.contextmanager
def in_mesh(mesh):
  """The context sharded steps are traced and run in: the mesh and the logical-axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def mesh_shape(mesh_cfg, num_devices):
  """(data, fsdp, tensor) sizes; -1 takes what the others leave. The mesh must use all of
  `num_devices` or a divisor of it (then it runs on the first devices)."""
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError("mesh", f"the fixed axes {dict(zip(MESH_AXES, sizes))} (product {fixed}) "
                        f"do not divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // fixed
  total = math.prod(sizes)
  if num_devices % total:
    raise ConfigError("mesh", f"data*fsdp*tensor = {total} does not divide the {num_devices} "
                      f"devices ({dict(zip(MESH_AXES, sizes))})")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None):
  """A mesh with Auto axis types (Linen's logical constraints need them) over `devices`."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  devices = np.asarray(devices[:math.prod(shape)]).reshape(shape)
  return jax.sharding.Mesh(devices, MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def check_divisible(cfg, shape):
  """Config errors for model dimensions that the mesh cannot split evenly."""
  data, fsdp, tensor = shape
  m = cfg.model
  if cfg.train.batch_size % (data * fsdp):
    raise ConfigError("train.batch_size", f"must be divisible by mesh data*fsdp = {data * fsdp}, "
                      f"got {cfg.train.batch_size}")
  for key in ("d_model",):
    if m[key] % fsdp:
      raise ConfigError(f"model.{key}", f"must be divisible by mesh.fsdp = {fsdp}, got {m[key]}")
  for key in ("num_heads", "num_kv_heads", "mlp_dim", "vocab_size"):
    if m[key] % tensor:
      raise ConfigError(f"model.{key}", f"must be divisible by mesh.tensor = {tensor}, got {m[key]}")


def logical_to_sharding(logical_specs, mesh):
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def param_shardings(model, mesh, init_fn):
  """NamedShardings of the (unboxed) parameters `init_fn()` returns as boxed variables."""
  abstract = jax.eval_shape(init_fn)
  return logical_to_sharding(nn.get_partition_spec(abstract), mesh)["params"]


def opt_state_shardings(optimizer, abstract_params, params_sharding, mesh):
  """Optimizer-state shardings: moments follow their parameters; counters are replicated."""
  abstract_state = jax.eval_shape(optimizer.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(optimizer, lambda _, s: s, abstract_state, params_sharding,
                               transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh):
  return NamedSharding(mesh, P(("data", "fsdp"), None))


def check_replication(abstract_params, params_sharding, mesh, tolerance):
  """ConfigError when more than `tolerance` of the parameter bytes would be replicated on a
  mesh of several devices (a rule that shards nothing wastes memory at scale)."""
  fraction = replicated_fraction(abstract_params, params_sharding)
  if mesh.devices.size > 1 and fraction > tolerance:
    raise ConfigError("mesh.max_replicated_fraction",
                      f"{100 * fraction:.1f}% of the parameter bytes are replicated on every "
                      f"device of mesh {dict(mesh.shape)}, above {100 * tolerance:.1f}%; change "
                      "the mesh or the rules in ftjax/sharding.py, or raise the tolerance")
  return fraction


def replicated_fraction(abstract_tree, shardings):
  """Share of the bytes of `abstract_tree` held whole on every device."""
  total = replicated = 0
  for leaf, s in zip(jax.tree_util.tree_leaves(abstract_tree), jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    size = leaf.size * leaf.dtype.itemsize
    total += size
    if s.is_fully_replicated:
      replicated += size
  return replicated / max(total, 1)
