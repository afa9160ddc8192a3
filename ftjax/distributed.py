"""Multi-process start-up with jax's own runtime (`jax.distributed`).

On SLURM and TPU VMs jax detects the coordinator, the process count and the process id itself;
elsewhere pass them explicitly (flags of the launchers, or the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID environment variables). A single process needs nothing.
"""

import concurrent.futures
import os
import sys
import threading
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, auto: bool = False,
               peer_timeout_seconds: float = 100) -> tuple[int, int]:
  """Starts the multi-process runtime when this is one of several processes; returns
  (process_index, process_count). Must run before any other jax call.

  Starts it when a coordinator and several processes are given, under a SLURM job of several
  tasks, or with `auto` (TPU VM slices: jax detects the workers). A process lost later ends the
  others within about `peer_timeout_seconds` with one line (see PeerWatchdog).
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
    # jax's own heartbeat is the backstop: PeerWatchdog notices a silent peer first and ends
    # the process with one line, where jax would abort it with a native stack trace.
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=2 * peer_timeout_seconds + 10)
  return jax.process_index(), jax.process_count()


_note = [lambda: ""]  # what stop_lost() adds to its line (e.g. the newest checkpoint)


def set_lost_note(note: Callable[[], str]) -> None:
  """`note()` (a sentence) is added to the line printed when a peer is lost."""
  _note[0] = note


def stop_lost(process: Optional[int], reason: str) -> None:
  """Prints one line naming the lost process and the note, and ends this process (status 1).
  os._exit: collectives and the runtime's shutdown barrier would wait for the lost peer."""
  who = f"process {process}" if process is not None else "a peer process"
  try:
    note = _note[0]()
  except Exception:  # noqa: BLE001
    note = ""
  parts = [f"error: {who} of the run was lost ({reason}); process {jax.process_index()} stops.",
           note, "Restart all processes with the same command to resume."]
  sys.stdout.flush()
  print(" ".join(p for p in parts if p), file=sys.stderr, flush=True)
  os._exit(1)


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple) -> slice:
  """The slice of batch rows that this process's devices hold under `sharding`."""
  rows = [idx[0] for idx in sharding.addressable_devices_indices_map(global_shape).values()]
  starts = [r.start or 0 for r in rows]
  stops = [global_shape[0] if r.stop is None else r.stop for r in rows]
  return slice(min(starts), max(stops))


def global_batch(local_batch: dict, sharding: jax.sharding.Sharding,
                 global_batch_size: int) -> dict:
  """A global jax.Array from this process's rows of every entry of `local_batch`."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size, *v.shape[1:]))
          for k, v in local_batch.items()}


def any_process(*flags_: bool) -> list[bool]:
  """Each host-side flag OR-ed over all processes (one allgather), so that the processes take a
  decision together: any process asking is enough (a single process: the flags as given)."""
  flags_ = np.array(flags_, bool)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    flags_ = np.asarray(multihost_utils.process_allgather(flags_)).any(axis=0)
  return [bool(f) for f in flags_]


def fetch(tree: Any) -> Any:
  """Host values of replicated arrays (e.g. metrics), also when other processes hold copies."""
  return jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data.__array__()
                                if isinstance(x, jax.Array) else x, tree)


class PeerWatchdog:
  """Notices a silent process of a multi-process run within `timeout_s` and ends this one.

  Each process bumps a counter in jax.distributed's key-value store every `timeout_s / 10`
  seconds and reads the others'. A peer whose counter has not moved for `timeout_s`, or a
  coordinator (process 0, which holds the store) not answering for that long, is lost:
  `stop_lost` prints one line and ends the process with status 1.
  """

  _KEY = "ftjax/alive/{}"

  def __init__(self, timeout_s, client=None):
    from jax._src import distributed as jax_distributed  # the runtime's client (no public API)
    self.timeout_s = float(timeout_s)
    self._client = client or jax_distributed.global_state.client
    self._me, self._count = jax.process_index(), jax.process_count()
    self._stop = threading.Event()
    self._lost = None  # (process, reason) once known
    self._verdict = threading.Event()
    self._thread = threading.Thread(target=self._run, name="ftjax-peer-watchdog", daemon=True)
    self._rpc = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ftjax-peer-rpc")

  def start(self) -> "PeerWatchdog":
    self._thread.start()
    return self

  def stop(self) -> None:
    """This process is done (its run ended): peers stop watching it."""
    self._stop.set()
    self._thread.join()
    try:
      self._rpc.submit(self._client.key_value_set, self._KEY.format(self._me), "done",
                       allow_overwrite=True).result(timeout=self.timeout_s)
    except Exception:  # noqa: BLE001 (a peer that is gone needs no notice)
      pass
    self._rpc.shutdown(wait=False)

  def _round(self, beat):
    """One heartbeat: ours written, the others' read ({process: value or None})."""
    self._client.key_value_set(self._KEY.format(self._me), str(beat), allow_overwrite=True)
    seen = {}
    for p in range(self._count):
      if p != self._me:
        try:
          seen[p] = self._client.key_value_try_get(self._KEY.format(p))
        except Exception as e:  # noqa: BLE001
          if "NOT_FOUND" not in str(e):
            raise
          seen[p] = None  # not beating yet
    return seen

  def _run(self):
    interval = max(self.timeout_s / 10, 0.05)
    now = time.monotonic()
    last_value = {p: None for p in range(self._count) if p != self._me}
    last_change = dict.fromkeys(last_value, now)
    last_contact, beat = now, 0
    while not self._stop.wait(interval):
      beat += 1
      try:
        seen = self._rpc.submit(self._round, beat).result(timeout=self.timeout_s)
      except Exception:  # noqa: BLE001 (the store is unreachable or failing)
        seen = None
      now = time.monotonic()
      if seen is None:
        if now - last_contact >= self.timeout_s:
          self._declare(0 if self._me != 0 else None,
                        f"the coordinator has not answered for {self.timeout_s:g} s")
        continue
      last_contact = now
      for p, value in seen.items():
        if value == "done":
          last_change[p] = float("inf")  # its run ended: not watched any more
        elif value != last_value[p]:
          last_value[p], last_change[p] = value, now
        elif now - last_change[p] >= self.timeout_s:
          self._declare(p, f"no heartbeat for {self.timeout_s:g} s")

  def _declare(self, process, reason):
    self._lost = (process, reason)
    self._verdict.set()
    stop_lost(process, reason)

  def lost(self, wait_s: Optional[float] = None) -> Optional[tuple[Optional[int], str]]:
    """(process, reason) of a lost peer, waiting up to `wait_s` seconds for one (None: the
    timeout and a little); None when every peer is alive. (The watchdog ends the process itself
    once it knows: this is for a main thread whose collective failed first.)"""
    self._verdict.wait(self.timeout_s * 1.5 + 1 if wait_s is None else wait_s)
    return self._lost
