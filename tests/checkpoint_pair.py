"""One of two processes of tests/test_checkpoint_integrity.py (one CPU device each):

  python -m tests.checkpoint_pair save|restore DIR --coordinator_address=... --num_processes=2
      --process_id=i

`save`: saves a state sharded over both devices at steps 1 and 2 in DIR/checkpoints and writes
DIR/hashed.process<i>.json, the files this process hashed (each call's list) and their entries.
`restore`: restores the newest sound step and prints "restored step N"."""

import argparse
import json
import os

import jax
import numpy as np

from ftjax import checkpoint, distributed, integrity
from ftjax.configs import default_config


def _state():
  mesh = jax.make_mesh((2,), ("x",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  values = {"w": np.arange(1 << 16, dtype=np.float32), "b": np.ones(1 << 12, np.float32)}
  state = {k: jax.make_array_from_callback(v.shape, sharded, lambda idx, v=v: v[idx])
           for k, v in values.items()}
  state["step"] = jax.device_put(np.int32(2), replicated)
  return state


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["save", "restore"])
  parser.add_argument("workdir")
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  args = parser.parse_args()
  me, _ = distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  directory = os.path.join(args.workdir, "checkpoints")
  state = _state()
  if args.mode == "restore":
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    manager = checkpoint.Manager(directory, read_only=True)
    restored, data_state = manager.restore(None, abstract)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a.addressable_data(0)), np.asarray(b.addressable_data(0))), restored, state)
    print(f"restored step {data_state['step']}", flush=True)
    return
  calls = []
  file_entries = integrity.file_entries

  def spy(directory, rels):
    entries = file_entries(directory, rels)
    calls.append(entries)
    return entries

  integrity.file_entries = spy
  manager = checkpoint.Manager(directory, default_config())
  for step in (1, 2):
    manager.save(step, state, {"step": step})
  manager.close()
  with open(os.path.join(args.workdir, f"hashed.process{me}.json"), "w") as f:
    json.dump(calls, f)


if __name__ == "__main__":
  main()
