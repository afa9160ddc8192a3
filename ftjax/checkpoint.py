"""Checkpoints with orbax: the train state and the resolved config, under `workdir/checkpoints`.

The data streams are pure functions of (seed, step), so the step in the train state is all the
data position a resumed run needs.
"""

import os

import orbax.checkpoint as ocp


class Manager:
  """A thin wrapper over `ocp.CheckpointManager` for one run directory."""

  def __init__(self, directory, cfg, max_to_keep=3):
    self._cfg = cfg
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step, state):
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(self._cfg.to_dict())))

  def restore_or(self, init_fn, abstract_state):
    """The newest saved state, restored onto the shapes and shardings of `abstract_state`
    (whatever mesh saved it), or `init_fn()` when the directory holds no checkpoint."""
    step = self._manager.latest_step()
    if step is None:
      return init_fn()
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
