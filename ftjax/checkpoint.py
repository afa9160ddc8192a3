"""Checkpoints with orbax: the train state and the resolved config, under `workdir/checkpoints`.

The data streams are pure functions of (seed, step), so the step in the train state is all the
data position a resumed run needs. `load_run` restores a run for sampling or evaluation onto the
devices at hand, whatever mesh trained it.
"""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from ftjax.configs import resolve
from ftjax.trainer import Trainer


class CheckpointError(RuntimeError):
  """A run directory without a usable checkpoint; the message names the directory."""


def _path_name(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shape_mismatches(saved_metadata, abstract_state):
  """Lines naming each array whose saved shape differs from what the config builds."""
  saved = {_path_name(p): tuple(m.shape)
           for p, m in jax.tree_util.tree_leaves_with_path(saved_metadata)}
  wanted = {_path_name(p): tuple(a.shape)
            for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)}
  lines = [f"{name}: checkpoint {saved.get(name)}, config {shape}"
           for name, shape in wanted.items() if saved.get(name) != shape]
  lines += [f"{name}: in the checkpoint, not built by the config" for name in saved
            if name not in wanted]
  return lines


class Manager:
  """orbax `CheckpointManager` for one run directory: async saves of the train state and the
  resolved config, the newest `keep` kept plus every `keep_period`-th step for good.

  orbax writes a step into a temporary directory and renames it when complete, so a save that
  is killed half-way never looks like a checkpoint; one that is complete but unreadable is
  skipped with a warning for the one before it.
  """

  def __init__(self, directory, cfg=None, read_only=False, log=print):
    self._cfg = cfg
    self._log = log
    self.directory = os.path.abspath(directory)  # orbax needs absolute paths
    c = cfg.checkpoint if cfg is not None else None
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=c.keep if c else None, keep_period=(c.keep_period or None) if c else None,
            create=not read_only, read_only=read_only, enable_async_checkpointing=True,
            cleanup_tmp_directories=not read_only),  # half-written saves of killed runs
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def _data_state_path(self, step):
    return os.path.join(self.directory, "data_state", f"{step}.process{jax.process_index()}.json")

  def _write_data_state(self, step, data_state):
    """Each process's data-iterator state, written (atomically) before the step's save starts,
    so that every committed step has one; files of deleted steps are removed."""
    path = self._data_state_path(step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(data_state, f)
    os.replace(path + ".tmp", path)
    oldest = min(self.all_steps(), default=step)
    for name in os.listdir(os.path.dirname(path)):
      if name.split(".")[0].isdigit() and int(name.split(".")[0]) < oldest:
        os.remove(os.path.join(os.path.dirname(path), name))

  def _read_data_state(self, step):
    try:
      with open(self._data_state_path(step), encoding="utf-8") as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise _Unreadable(f"its data-iterator state: {e}") from e

  def save(self, step, state, data_state):
    """Starts an async save of `state` and the data stream's state at `step` (training goes
    on while it is written)."""
    if step in self._manager.all_steps():
      return
    self._write_data_state(step, data_state)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(self._cfg.to_dict())))

  def _restore_step(self, step, abstract_state):
    try:
      metadata = self._manager.item_metadata(step)["state"]
    except Exception as e:  # noqa: BLE001 (orbax raises many kinds for a damaged step)
      raise _Unreadable(f"{type(e).__name__}: {e}") from e
    mismatches = shape_mismatches(metadata, abstract_state)
    if mismatches:
      raise CheckpointError(f"the checkpoint at step {step} in {self.directory} does not match "
                            f"the config: {mismatches[0]}" +
                            (f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""))
    data_state = self._read_data_state(step)
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))["state"], data_state
    except Exception as e:  # noqa: BLE001
      raise _Unreadable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

  def restore(self, step, abstract_state):
    """(state, data-stream state) saved at `step` (None: the newest readable one, falling back
    over damaged steps with a warning), the state placed as `abstract_state` says, whatever
    mesh saved it."""
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step is not None and step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                            f"(saved steps: {steps})")
    for candidate in ([step] if step is not None else steps[::-1]):
      try:
        return self._restore_step(candidate, abstract_state)
      except _Unreadable as e:
        self._log(f"warning: checkpoint step {candidate} in {self.directory} is unreadable "
                  f"({e}); " + ("giving up" if step is not None else "trying an older one"))
    raise CheckpointError(f"no readable checkpoint in {self.directory} (steps {steps})")

  def restore_or(self, init_fn, abstract_state):
    """The newest readable (state, data-stream state), or (`init_fn()`, None) when the
    directory holds no checkpoint."""
    if not self.all_steps():
      return init_fn(), None
    return self.restore(None, abstract_state)

  def wait(self):
    """Blocks until the async save in flight (if any) is complete."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


class _Unreadable(Exception):
  """A damaged checkpoint step (internal: restore() falls back over it)."""


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
  cfg = load_config(workdir).copy_and_resolve_references()
  cfg.unlock()
  cfg.mesh.update(mesh or {"data": 1, "fsdp": 1, "tensor": 1})
  cfg.lock()
  trainer = Trainer.create(cfg, run_dir=workdir)  # with the run's own tokenizer
  manager = Manager(os.path.join(workdir, "checkpoints"), read_only=True)
  state, _ = manager.restore(step, trainer.abstract_state())
  manager.close()
  return trainer, state
