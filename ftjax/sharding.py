"""Device mesh, logical-axis rules, and the shardings of the train state and batches.

One table, `LOGICAL_RULES`, maps the logical axis names that layers put on parameters and
activations to the mesh axes `data`, `fsdp` and `tensor`. Layers never name mesh axes; changing
the mesh (config `mesh.*`) moves the same model from one device to a pod.
"""

import contextlib
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ftjax.errors import ConfigError

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


def mesh_shape(mesh_cfg, num_devices: int) -> tuple:
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


def make_mesh(mesh_cfg, devices: Optional[Sequence] = None) -> jax.sharding.Mesh:
  """A mesh with Auto axis types (Linen's logical constraints need them) over `devices`."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  devices = np.asarray(devices[:math.prod(shape)]).reshape(shape)
  return jax.sharding.Mesh(devices, MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _axes_size(mesh, axes):
  """Devices along the mesh axes one spec entry names (None, a name or a tuple of names)."""
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def batch_spec() -> P:
  """PartitionSpec of a (B, T, …) batch array: rows split as the `batch` rule says."""
  return P(dict(LOGICAL_RULES)["batch"], None)


def check_batch_divisible(cfg, mesh: jax.sharding.Mesh) -> None:
  """ConfigError unless every microbatch splits evenly over the batch's mesh axes."""
  rows = _axes_size(mesh, batch_spec()[0])
  accum = cfg.train.grad_accum_steps
  if cfg.train.batch_size % (rows * accum):
    raise ConfigError("train.batch_size", f"must be divisible by the batch's devices ({rows}) × "
                      f"train.grad_accum_steps ({accum}) = {rows * accum}, "
                      f"got {cfg.train.batch_size}")


def check_params_divisible(abstract_params, params_sharding, mesh: jax.sharding.Mesh) -> None:
  """ConfigError naming the first parameter with a dimension its mesh axes do not divide."""
  leaves = jax.tree_util.tree_leaves_with_path(abstract_params)
  shardings = jax.tree_util.tree_leaves(params_sharding,
                                        is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), s in zip(leaves, shardings):
    for dim, axes in zip(leaf.shape, s.spec):
      size = _axes_size(mesh, axes)
      if dim % size:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ConfigError("mesh", f"parameter {name} of shape {leaf.shape}: dimension {dim} is "
                          f"split over mesh axes {axes} of {size} devices, which do not divide "
                          f"it; change the mesh or the model size")


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


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_spec())


def check_replication(abstract_params, params_sharding, mesh: jax.sharding.Mesh,
                      tolerance: float) -> float:
  """ConfigError when more than `tolerance` of the parameter bytes would be replicated on a
  mesh of several devices (a rule that shards nothing wastes memory at scale)."""
  fraction = replicated_fraction(abstract_params, params_sharding)
  if mesh.devices.size > 1 and fraction > tolerance:
    raise ConfigError("mesh.max_replicated_fraction",
                      f"{100 * fraction:.1f}% of the parameter bytes are replicated on every "
                      f"device of mesh {dict(mesh.shape)}, above {100 * tolerance:.1f}%; change "
                      "the mesh or the rules in ftjax/sharding.py, or raise the tolerance")
  return fraction


def replicated_fraction(abstract_tree, shardings) -> float:
  """Share of the bytes of `abstract_tree` held whole on every device."""
  total = replicated = 0
  for leaf, s in zip(jax.tree_util.tree_leaves(abstract_tree), jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    size = leaf.size * leaf.dtype.itemsize
    total += size
    if s.is_fully_replicated:
      replicated += size
  return replicated / max(total, 1)
