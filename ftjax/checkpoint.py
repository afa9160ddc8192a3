"""Checkpoints with orbax: the train state and the resolved config, under `workdir/checkpoints`.

A step directory `checkpoints/<step>` is committed by orbax's atomic rename; just before it, in
the save's background thread, process 0 writes `checkpoints/<step>/checksums.json`: the size and
SHA-256 of every other file of the step (hashed by several threads; a file over 64 MiB by
segments), so that a committed step carries integrity data for all of its bytes. Each process
hashes the array files it wrote as soon as its own writes are complete, in parallel with the
others, and hands the entries to process 0 through jax's key-value store; process 0 hashes the
rest (metadata, the merged OCDBT root, the config). Each process's data-stream state is a small
file next to it, `checkpoints/data_state/<step>.process<i>.json`, with its own SHA-256 in its
first line. Restoring verifies both (`checkpoint.verify`); a step that fails is skipped for the
previous one with one warning line naming the step and the file; `restore_params` reads a
step's parameters alone. Hashing and manifests are `ftjax.integrity`'s; the run directory around
the checkpoints is `ftjax.run`'s.
"""

import fnmatch
import json
import os
import re
import sys
from typing import Any, Callable, Optional, Union

import jax
import ml_collections
import orbax.checkpoint as ocp

from ftjax import distributed, integrity, storage
from ftjax.integrity import CHECKSUMS, CHECKSUMS_SINCE, COMMIT_MARKER, verify_files, write_checksums
from ftjax.configs import default_config, resolve
from ftjax.errors import CheckpointError, SaveError, StorageError

PathLike = Union[str, os.PathLike]  # a directory: a str or a pathlib.Path


def require_storage(path: PathLike) -> None:
  """Raises CheckpointError (one line) unless `path` is a local path or a reachable gs:// or
  s3:// bucket (`ftjax.storage.use_bucket`)."""
  try:
    storage.use_bucket(path)
  except StorageError as e:
    raise CheckpointError(str(e)) from None


def _path_name(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shape_mismatches(saved_metadata: Any, abstract_state: Any) -> list[str]:
  """Lines naming each array whose saved shape differs from what the config builds."""
  saved = {_path_name(p): tuple(m.shape)
           for p, m in jax.tree_util.tree_leaves_with_path(saved_metadata)}
  wanted = {_path_name(p): None if a is ocp.PLACEHOLDER else tuple(a.shape)  # not read
            for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)}
  lines = [f"{name}: checkpoint {saved.get(name)}, config {shape}"
           for name, shape in wanted.items() if shape is not None and saved.get(name) != shape]
  lines += [f"{name}: in the checkpoint, not built by the config" for name in saved
            if name not in wanted]
  return lines


def state_bytes(abstract_state: Any) -> int:
  """Bytes of the arrays of a (abstract) train state: a checkpoint's size before compression."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract_state)
             if hasattr(x, "dtype"))


def committed_steps(directory: PathLike) -> list[int]:
  """Steps with a committed directory under `directory` (orbax's temporaries excluded; on a
  bucket, where a step is committed by its marker file, only those that hold it)."""
  try:
    names = storage.listdir(directory)
  except OSError:
    return []
  if storage.is_url(directory):
    return sorted(int(n) for n in names if n.isdigit() and
                  storage.exists(os.path.join(directory, n, COMMIT_MARKER)))
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _cause(e: Optional[BaseException]) -> str:
  """A short one-line description of an exception and the errors that caused it."""
  seen = []
  while e is not None and len(seen) < 8:
    seen.append(e)
    e = e.__cause__ or e.__context__
  for err in reversed(seen):  # the innermost error says what the storage said
    if isinstance(err, OSError) and err.strerror:
      return f"{err.strerror} ({err.filename})" if err.filename else err.strerror
  text = next((str(err).strip().splitlines()[0] for err in seen if str(err).strip()),
              type(seen[0]).__name__)
  code = re.search(r"os_error_code='?(\d+)", text)  # tensorstore: the OS error, and its file
  if code:
    paths = re.findall(r'"(/[^"]+)"', text)
    return os.strerror(int(code.group(1))) + (f" (writing {paths[-1]})" if paths else "")
  return text if len(text) <= 300 else text[:300] + "..."


def _quiet_orphaned_writes() -> None:
  """After a save fails, orbax closes the save's event loop while tensorstore still completes
  its other writes; each completion's callback then raises 'Event loop is closed' as an
  unraisable exception (hundreds of tracebacks, the failure itself is raised as SaveError).
  Those, and only those, are dropped."""
  previous = sys.unraisablehook
  if getattr(previous, "_ftjax_quiet", False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook._ftjax_quiet = True
  sys.unraisablehook = hook


class Manager:
  """orbax `CheckpointManager` for one run directory: async saves of the train state and the
  resolved config, the newest `keep` kept plus every `keep_period`-th step for good.

  orbax writes a step into a temporary directory and renames it when complete (after the
  checksums are written into it), so a save that is killed half-way never looks like a
  checkpoint; one that is complete but unreadable or whose bytes differ from its checksums is
  skipped with a warning for the one before it. A save that fails in the background is raised
  as SaveError by the next `check`, `save`, `wait` or `close`.
  """

  def __init__(self, directory: PathLike, cfg: Optional[ml_collections.ConfigDict] = None,
               read_only: bool = False, log: Callable[[str], Any] = print) -> None:
    require_storage(directory)
    self._cfg = cfg
    self._log = log
    self.directory = storage.absolute(directory)  # orbax needs absolute paths
    c = cfg.checkpoint if cfg is not None else None
    self.verify = c.verify if c is not None and "verify" in c else True
    self._saving = None  # the step whose save is in flight
    self._failed = None  # SaveError of a failed save, raised once
    self._save_failed = False  # a SaveError was made: close() touches the storage no more
    self._verified = set()  # (step, share) whose files this process checked
    self._hashed = None  # process 0: (step directory, its entries) of the save in flight
    if not read_only:
      _quiet_orphaned_writes()
    if not read_only and storage.is_url(self.directory):
      # Before orbax lists the steps: its client caches the listing, and a step it saw would
      # later be "removed" again before its next save (gcsfs: FileNotFoundError, a failed save).
      self._remove_uncommitted()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=c.keep if c else None, keep_period=(c.keep_period or None) if c else None,
            create=not read_only, read_only=read_only, enable_async_checkpointing=True,
            # Half-written saves of killed runs. orbax's cleanup on a bucket would also take
            # data_state/ (no commit marker of its own): there `_remove_uncommitted` does it.
            cleanup_tmp_directories=not read_only and not storage.is_url(self.directory),
            async_options=ocp.AsyncOptions(post_finalization_callback=self._before_commit),
            **storage.checkpoint_options(self.directory)),
        item_handlers={"state": _hash_when_written(ocp.StandardCheckpointHandler(),
                                                   self._hash_own_files),
                       "config": ocp.JsonCheckpointHandler()})

  def _remove_uncommitted(self) -> None:
    """Deletes the step directories on a bucket that lack orbax's commit marker (saves a killed
    run left half-written); process 0 only."""
    if jax.process_index() != 0:
      return
    committed = set(committed_steps(self.directory))
    for name in storage.listdir(self.directory):
      if name.isdigit() and int(name) not in committed:
        storage.remove_tree(os.path.join(self.directory, name))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  # Data-stream state files ------------------------------------------------------------------

  def _data_state_path(self, step: int, process: Optional[int] = None) -> str:
    process = jax.process_index() if process is None else process
    return os.path.join(self.directory, "data_state", f"{step}.process{process}.json")

  def _write_data_state(self, step: int, data_state: Any) -> None:
    """This process's data-iterator state, written (atomically, with its checksum) before the
    step's save starts, so that every committed step has one."""
    path = self._data_state_path(step)
    storage.makedirs(os.path.dirname(path))
    integrity.write_checked(path, data_state)

  def _remove_old_data_states(self, step: int) -> None:
    """Removes this process's data-state files of steps before `step` whose checkpoint is gone
    from disk (deleted by the keep policy, or never committed). Only this process's files:
    processes sharing the directory never race on a file; one already gone is fine."""
    directory = os.path.join(self.directory, "data_state")
    suffix = f".process{jax.process_index()}.json"
    on_disk = set(committed_steps(self.directory))
    for name in storage.listdir(directory):
      head = name.split(".")[0]
      mine = name.endswith(suffix) or (f"{suffix}.tmp" in name)
      if mine and head.isdigit() and int(head) < step and int(head) not in on_disk:
        try:
          storage.remove(os.path.join(directory, name))
        except FileNotFoundError:
          pass

  def _read_data_state(self, step: int) -> Any:
    """This process's data-stream state at `step`. A run resumed with another number of
    processes gets the state all processes saved when they saved the same one (in-memory
    sources: the step); per-process states (grain) need the same number of processes."""
    own = self._data_state_path(step)
    directory = os.path.join(self.directory, "data_state")
    saved = [os.path.join(directory, name) for name in storage.listdir(directory)
             if fnmatch.fnmatch(name, f"{step}.process*.json")]
    if len(saved) == jax.process_count() and own in saved:
      return integrity.read_checked(own, legacy_ok=True)
    if not saved:
      raise integrity.Unreadable(f"{os.path.basename(own)}: missing", own)
    states = [integrity.read_checked(path, legacy_ok=True) for path in sorted(saved)]
    if any(state != states[0] for state in states):
      raise CheckpointError(
          f"the checkpoint at step {step} in {self.directory} holds per-process data-stream "
          f"states of {len(saved)} processes: resume with {len(saved)} processes")
    return states[0]

  # Saving -------------------------------------------------------------------------------------

  def _hashed_key(self, process: int) -> str:
    return f"ftjax/checksums/{self.directory}/{self._saving}/{process}"

  def _hash_own_files(self, item_dir: str) -> None:
    """Each process, in the save's background thread once its writes to `item_dir` (the state
    item's directory, still under its temporary name) are complete: the manifest entries of the
    files it wrote there, for process 0's manifest."""
    entries = {f"state/{rel}": entry for rel, entry in
               integrity.file_entries(item_dir, _own_files(item_dir)).items()}
    if jax.process_index() == 0:
      self._hashed = (os.path.dirname(item_dir), entries)
    else:
      _kv_store().key_value_set(self._hashed_key(jax.process_index()), json.dumps(entries),
                                allow_overwrite=True)

  def _before_commit(self) -> None:
    """orbax calls this on process 0 in the save's background thread, after every process's
    files of the step are complete (each has hashed its own: `_hash_own_files`) and before the
    temporary directory is renamed (on a bucket: before the marker file): the manifest, the
    processes' entries and those of the other files, becomes part of the commit (a step whose
    manifest could not be written is never committed)."""
    if self._hashed is None:
      raise RuntimeError(f"the files of step {self._saving} were not hashed")
    step_dir, hashed = self._hashed
    for process in range(1, jax.process_count()):  # each set its entries before the barrier
      key, store = self._hashed_key(process), _kv_store()
      hashed.update(json.loads(store.blocking_key_value_get(key, 60_000)))
      store.key_value_delete(key)
    write_checksums(step_dir, hashed)

  def _mark_checksums_since(self, step: int) -> None:
    path = os.path.join(self.directory, CHECKSUMS_SINCE)
    if jax.process_index() == 0 and not storage.exists(path):
      integrity.write_checked(path, {"step": int(step)})

  def _checksums_since(self) -> Optional[int]:
    path = os.path.join(self.directory, CHECKSUMS_SINCE)
    if not storage.exists(path):
      return None
    try:
      return int(integrity.read_checked(path)["step"])
    except (integrity.Unreadable, ValueError, KeyError, TypeError):
      return 0  # a damaged marker: every step must carry valid checksums

  def _save_error(self, step: Optional[int], e: BaseException,
                  what: str = "the checkpoint") -> SaveError:
    self._save_failed = True
    # On a bucket the store may be what failed (listing it would wait out the client's retries
    # and fail too): the steps this manager knows to be complete (orbax drops a failed one).
    if storage.is_url(self.directory):
      in_flight = self._saving if self._manager.is_saving_in_progress() else None
      newest = [s for s in self.all_steps() if s not in (step, in_flight)]
    else:
      newest = [s for s in committed_steps(self.directory) if s != step]
    return SaveError(
        f"cannot save {what} of step {step} in {self.directory}: {_cause(e)}. "
        + (f"The newest complete checkpoint is step {newest[-1]}. " if newest else
           "No checkpoint has been completed. ")
        + ("Check that the bucket can be reached and written to" if storage.is_url(self.directory)
           else "Free space (or lower checkpoint.keep) or fix the directory's permissions")
        + ", then run the same command to resume.")

  def check(self) -> None:
    """Raises SaveError if the save in flight has failed (cheap: no waiting)."""
    if self._failed is None and self._saving is not None:
      holder = getattr(self._manager, "_finalize_thread", None)
      try:
        failed = holder.map(lambda t: t is not None and not t.is_alive()
                            and t.exception is not None)
      except Exception:  # noqa: BLE001 (orbax internals changed: surface it at the next wait)
        failed = False
      if failed:
        self._fail_from_wait()
    self._raise_failed()

  def _fail_from_wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._failed = self._save_error(self._saving, e)

  def _raise_failed(self) -> None:
    if self._failed is not None:
      failed, self._failed = self._failed, None
      self._saving = None
      raise failed

  def save(self, step: int, state: Any, data_state: Any) -> None:
    """Starts an async save of `state` and the data stream's state at `step` (training goes
    on while it is written). Raises SaveError if this or the previous save failed."""
    if step in self._manager.all_steps():
      return
    self.check()
    try:
      self._write_data_state(step, data_state)
      self._mark_checksums_since(step)
    except OSError as e:
      raise self._save_error(step, e, "the data-stream state") from None
    previous = self._saving
    try:
      self._manager.wait_until_finished()  # the previous save: its failure is its own error
    except Exception as e:  # noqa: BLE001
      self._saving = None  # reported here (orbax raises it once)
      raise self._save_error(previous, e) from None
    self._saving, self._hashed = step, None
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          config=ocp.args.JsonSave(self._cfg.to_dict())))
    except Exception as e:  # noqa: BLE001
      self._saving = None
      raise self._save_error(step, e) from None
    try:
      self._remove_old_data_states(step)
    except OSError as e:
      raise self._save_error(step, e, "the data-stream state") from None

  def wait(self) -> None:
    """Blocks until the async save in flight (if any) is complete; SaveError if it failed."""
    if self._saving is not None and self._failed is None:
      self._fail_from_wait()
    self._raise_failed()

  def close(self) -> None:
    """Waits for the save in flight and closes; SaveError if it failed. Never raises twice."""
    try:
      saving = self._saving
      self.wait()
      # Files of the steps the last save's keep policy deleted; not after a failed save (the
      # storage may be what failed: on a bucket each request would wait out the retries).
      if saving is not None and not self._save_failed:
        try:
          self._remove_old_data_states(saving + 1)
        except OSError:
          pass
    finally:
      try:
        self._manager.close()
      except Exception:  # noqa: BLE001 (the failure was reported by wait)
        pass

  # Restoring ----------------------------------------------------------------------------------

  def _warn(self, message: str) -> None:
    if jax.process_index() == 0:
      self._log(message)
    else:  # other processes' logs are silent; a problem only they see still gets its line
      print(f"process {jax.process_index()}: {message}", file=sys.stderr, flush=True)

  def _verify_step(self, step: int) -> Any:
    """Checks this process's share of the step's files and its own data-state file; returns
    the data-stream state. Raises integrity.Unreadable naming the file."""
    step_dir = os.path.join(self.directory, str(step))
    data_state = self._read_data_state(step)
    if not self.verify:
      return data_state
    if not storage.exists(os.path.join(step_dir, CHECKSUMS)):
      since = self._checksums_since()
      if since is not None and step >= since:
        raise integrity.Unreadable(f"{CHECKSUMS}: missing", CHECKSUMS)
      self._warn(f"warning: checkpoint step {step} in {self.directory} has no checksums "
                 "(saved before ftjax wrote them): restored unverified")
      return data_state
    self._check_files(step, (jax.process_index(), jax.process_count()))
    return data_state

  def _check_files(self, step: int, share: tuple[int, int]) -> None:
    if (step, share) not in self._verified:
      verify_files(os.path.join(self.directory, str(step)), share)
      self._verified.add((step, share))

  def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    metadata, data_state = self._sound_step(step)
    self._check_shapes(step, metadata, abstract_state)
    try:
      return self._read_state(step, abstract_state), data_state
    except Exception as e:  # noqa: BLE001
      raise integrity.Unreadable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

  def _sound_step(self, step: int) -> tuple[Any, Any]:
    """(the state's orbax metadata, this process's data-stream state) of a step every process
    found sound (each checks its share of the files); integrity.Unreadable otherwise."""
    problem = metadata = data_state = None
    try:
      data_state = self._verify_step(step)  # first: orbax may choke on damaged metadata
      metadata = self._manager.item_metadata(step)["state"]
    except integrity.Unreadable as e:
      problem = e
    except Exception as e:  # noqa: BLE001 (orbax raises many kinds for a damaged step)
      problem = integrity.Unreadable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if distributed.any_process(problem is not None)[0]:  # a process found the step unsound
      raise problem or integrity.Unreadable("another process found it damaged")
    self._verified.add((step, (0, 1)))  # each process checked its share: the step is sound
    return metadata, data_state

  def _check_shapes(self, step: int, metadata: Any, abstract: Any) -> None:
    mismatches = shape_mismatches(metadata, abstract)
    if mismatches:
      raise CheckpointError(f"the checkpoint at step {step} in {self.directory} does not match "
                            f"the config: {mismatches[0]}" +
                            (f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""))

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """The parameters saved at `step`, alone (the optimizer state is not read), placed as
    `abstract_params` says; the step is checked as a full restore checks it. CheckpointError
    for a damaged step or other shapes."""
    try:
      metadata, _ = self._sound_step(step)
      self._check_shapes(step, metadata["params"], abstract_params)
      restore_args = jax.tree_util.tree_map(lambda a: ocp.ArrayRestoreArgs(
          sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), abstract_params)
      with ocp.PyTreeCheckpointer() as reader:
        return reader.restore(os.path.join(self.directory, str(step), "state"),
                              args=ocp.args.PyTreeRestore({"params": abstract_params},
                                                          {"params": restore_args},
                                                          partial_restore=True))["params"]
    except integrity.Unreadable as e:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged ({e})") \
          from None
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 (orbax raises many kinds for a damaged step)
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable "
                            f"({_cause(e)})") from None

  def _read_state(self, step: int, abstract_state: Any) -> Any:
    """The state saved at `step`, placed as `abstract_state` says; its `ocp.PLACEHOLDER` leaves
    (e.g. the optimizer state, for sampling) are neither read nor allocated."""
    if not any(leaf is ocp.PLACEHOLDER for leaf in jax.tree_util.tree_leaves(abstract_state)):
      return self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))["state"]
    restore_args = jax.tree_util.tree_map(
        lambda a: a if a is ocp.PLACEHOLDER else ocp.ArrayRestoreArgs(
            sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), abstract_state)
    with ocp.PyTreeCheckpointer() as reader:  # the manager's handler takes no placeholders
      return reader.restore(os.path.join(self.directory, str(step), "state"),
                            args=ocp.args.PyTreeRestore(abstract_state, restore_args))

  def saved_steps(self, step: Optional[int] = None) -> list[int]:
    """The saved steps; CheckpointError when there are none or `step` (if given) is not one."""
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step is not None and step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                            f"(saved steps: {steps})")
    return steps

  def restore(self, step: Optional[int], abstract_state: Any) -> tuple[Any, Any]:
    """(state, data-stream state) saved at `step` (None: the newest readable one, falling back
    over damaged steps with a warning), the state placed as `abstract_state` says, whatever
    mesh saved it; its `ocp.PLACEHOLDER` leaves are not read (`without_optimizer`)."""
    steps = self.saved_steps(step)
    for candidate in ([step] if step is not None else steps[::-1]):
      try:
        return self._restore_step(candidate, abstract_state)
      except integrity.Unreadable as e:
        if step is not None:
          raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged ({e})") \
              from None
        self._warn(f"warning: checkpoint step {candidate} in {self.directory} is damaged or "
                   f"unreadable ({e}); trying an older one")
    raise CheckpointError(f"no readable checkpoint in {self.directory} (steps {steps})")

  def restore_or(self, init_fn: Callable[[], Any], abstract_state: Any) -> tuple[Any, Any]:
    """The newest readable (state, data-stream state), or (`init_fn()`, None) when the
    directory holds no checkpoint."""
    if not self.all_steps():
      return init_fn(), None
    return self.restore(None, abstract_state)

  def saved_config(self, step: int) -> ml_collections.ConfigDict:
    """The resolved config saved with `step` (checked against the step's checksums first)."""
    try:
      self._verify_step_files_only(step)
      saved = self._manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))["config"]
    except integrity.Unreadable as e:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged ({e})") \
          from None
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable "
                            f"({_cause(e)})") from None
    return _with_defaults(saved)

  def _verify_step_files_only(self, step: int) -> None:
    step_dir = os.path.join(self.directory, str(step))
    if not self.verify:
      return
    if storage.exists(os.path.join(step_dir, CHECKSUMS)):
      self._check_files(step, (0, 1))
    else:
      since = self._checksums_since()
      if since is not None and step >= since:
        raise integrity.Unreadable(f"{CHECKSUMS}: missing", CHECKSUMS)


def _own_files(item_dir: str) -> list[str]:
  """The files of an orbax item directory (relative to it) that this process wrote: with OCDBT,
  its database `ocdbt.process_<i>/` and its array metadata `array_metadatas/process_<i>`."""
  i = jax.process_index()
  db, meta = f"ocdbt.process_{i}", f"array_metadatas/process_{i}"
  files = [f"{db}/{rel}" for rel in storage.files_under(os.path.join(item_dir, db))]
  return files + ([meta] if storage.exists(os.path.join(item_dir, meta)) else [])


def _hash_when_written(handler: Any, hash_files: Callable[[str], None]) -> Any:
  """`handler` (an orbax async handler) whose saves end, on each process, with
  `hash_files(item_dir)` once this process's writes are complete: in the save's background
  thread, before the barrier of all processes that precedes the commit."""
  save = handler.async_save

  async def async_save(directory, *args, **kwargs):
    futures = await save(directory, *args, **kwargs) or []
    return [ocp.future.ChainedFuture(futures, lambda: hash_files(str(directory)))]

  handler.async_save = async_save  # on the instance: orbax finds the handler's args by its class
  return handler


def _kv_store():
  from jax._src import distributed as jax_distributed  # the runtime's client (no public API)
  return jax_distributed.global_state.client


def _with_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A saved config dict, resolved, with keys added to the schema since it was saved given
  their defaults."""

  def fill(dst, defaults):
    for k, v in defaults.items():
      if isinstance(v, dict):
        fill(dst.setdefault(k, {}), v)
      else:
        dst.setdefault(k, v)
    return dst

  return resolve(ml_collections.ConfigDict(fill(dict(saved), default_config().to_dict())))


def without_optimizer(abstract_state: Any) -> Any:
  """`abstract_state` with `ocp.PLACEHOLDER` for every optimizer leaf: a restore then reads the
  parameters and counters only."""
  return abstract_state.replace(
      opt_state=jax.tree_util.tree_map(lambda _: ocp.PLACEHOLDER, abstract_state.opt_state))
