"""Checkpoints with orbax: the train state and the resolved config, under `workdir/checkpoints`.

The data streams are pure functions of (seed, step), so the step in the train state is all the
data position a resumed run needs. `load_run` restores a run for sampling or evaluation onto the
devices at hand, whatever mesh trained it.
"""

import json
import os

import ml_collections
import orbax.checkpoint as ocp

from ftjax.configs import resolve


class CheckpointError(RuntimeError):
  """A run directory without a usable checkpoint; the message names the directory."""


class Manager:
  """A thin wrapper over `ocp.CheckpointManager` for one run directory."""

  def __init__(self, directory, cfg=None, max_to_keep=3, read_only=False):
    self._cfg = cfg
    self.directory = os.path.abspath(directory)  # orbax needs absolute paths
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only))

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step, state):
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(self._cfg.to_dict())))

  def restore(self, step, abstract_state):
    """The state saved at `step` (None: the newest), placed as `abstract_state` says."""
    steps = self._manager.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    step = max(steps) if step is None else step
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                            f"(saved steps: {sorted(steps)})")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def restore_or(self, init_fn, abstract_state):
    """The newest saved state, restored onto the shapes and shardings of `abstract_state`
    (whatever mesh saved it), or `init_fn()` when the directory holds no checkpoint."""
    if self._manager.latest_step() is None:
      return init_fn()
    return self.restore(None, abstract_state)

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def load_config(workdir):
  """The resolved config a run saved in `workdir/config.json`."""
  path = os.path.join(workdir, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      return resolve(ml_collections.ConfigDict(json.load(f)))
  except FileNotFoundError as e:
    raise CheckpointError(f"{path} not found: is {workdir} a run directory?") from e
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def load_run(workdir, step=None, mesh=None):
  """(trainer, state) of a run restored onto the devices at hand.

  `mesh` ({'data', 'fsdp', 'tensor'}; default one device) replaces the mesh the run trained on;
  the checkpoint is resharded onto it.
  """
  from ftjax import train  # train imports this module
  cfg = load_config(workdir).copy_and_resolve_references()
  cfg.unlock()
  cfg.mesh.update(mesh or {"data": 1, "fsdp": 1, "tensor": 1})
  cfg.lock()
  trainer = train.Trainer.create(cfg)
  manager = Manager(os.path.join(workdir, "checkpoints"), read_only=True)
  state = manager.restore(step, trainer.abstract_state())
  manager.close()
  return trainer, state
