"""Multi-process start-up with jax's own runtime (`jax.distributed`).

On SLURM and TPU VMs jax detects the coordinator, the process count and the process id itself;
elsewhere pass them explicitly (flags of the launchers, or the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID environment variables). A single process needs nothing.
"""

import os

import jax

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(coordinator_address=None, num_processes=None, process_id=None, auto=False):
  """Starts the multi-process runtime when this is one of several processes; returns
  (process_index, process_count). Must run before any other jax call.

  Starts it when a coordinator and several processes are given, under a SLURM job of several
  tasks, or with `auto` (TPU VM slices: jax detects the workers).
  """
  coordinator_address = coordinator_address or os.environ.get(ENV[0])
  if num_processes is None and ENV[1] in os.environ:
    num_processes = int(os.environ[ENV[1]])
  if process_id is None and ENV[2] in os.environ:
    process_id = int(os.environ[ENV[2]])
  explicit = coordinator_address is not None and (num_processes or 1) > 1
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if explicit or slurm or auto:
    # Collectives between CPU devices of different processes go through gloo (only the CPU
    # backend reads this; GPU and TPU use their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  return jax.process_index(), jax.process_count()


def process_rows(sharding, global_shape):
  """The slice of batch rows that this process's devices hold under `sharding`."""
  rows = [idx[0] for idx in sharding.addressable_devices_indices_map(global_shape).values()]
  starts = [r.start or 0 for r in rows]
  stops = [global_shape[0] if r.stop is None else r.stop for r in rows]
  return slice(min(starts), max(stops))


def global_batch(local_batch, sharding, global_batch_size):
  """A global jax.Array from this process's rows of every entry of `local_batch`."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size, *v.shape[1:]))
          for k, v in local_batch.items()}


def fetch(tree):
  """Host values of replicated arrays (e.g. metrics), also when other processes hold copies."""
  return jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data.__array__()
                                if isinstance(x, jax.Array) else x, tree)
