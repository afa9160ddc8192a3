"""The training loop and its host-side run control: progress lines, one-step-late metrics,
cadence of logs, evals and saves, SIGTERM, the non-finite policy and end-of-run samples."""

import dataclasses
import errno
import math
import os
import signal
import threading
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import (configs, distributed, metrics as metrics_lib, preflight, sampling, sharding,
                   storage, trackers, train)
from ftjax.configs import config_changes, profile_steps, tracker_names
from ftjax.errors import NonFiniteError, SaveError, WriteError
from ftjax.model import make_model
from ftjax.trainer import Trainer

LOG2 = math.log(2)


def format_progress(step: int, total: int, m: dict, tokens_per_step: int) -> str:
  """One readable line: step, loss, ce, kl in bits, tokens/s, MFU, ETA."""
  parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"ce {m['ce']:.4f}"]
  if "kl" in m:
    parts.append(f"kl {m['kl'] / LOG2:.3f} bits")
  if "tokens_per_sec" in m:
    eta_s = int((total - step) * tokens_per_step / max(m["tokens_per_sec"], 1e-9))
    parts += [f"{m['tokens_per_sec']:,.0f} tok/s", f"MFU {100 * m['mfu']:.1f}%",
              f"ETA {eta_s // 60}m{eta_s % 60:02d}s"]
  return " | ".join(parts)


def format_eval(step: int, ev: dict) -> str:
  """The eval line a person reads, in `metrics_lib.display_unit`'s units; only the converted ones
  are named (KL values in bits: metrics.jsonl keeps nats)."""
  per_bit = [v for k, v in ev.items() if k.startswith("eval_z_kl_bit")]  # in metrics.jsonl
  ev = {k: v for k, v in ev.items() if not k.startswith("eval_z_kl_bit")}
  if per_bit:
    ev["eval_z_kl_max_bit"] = max(per_bit)

  def shown(k, v):
    if isinstance(v, int):
      return f"{k} {v}"
    divisor, unit = metrics_lib.display_unit(k)
    return f"{k} {v / divisor:.4f}" + (f" {unit.split(' per ')[0]}" if divisor != 1 else "")

  return f"eval step {step} | " + " | ".join(shown(k, v) for k, v in ev.items())


def _describe(cfg, trainer, state):
  """Start-up lines: parameters, latent, mesh and how much of the parameters is replicated."""
  lat = cfg.model.latent
  kl_term = (f"target rate {lat.target_bits:.4g} bits" if lat.kl_control == "target_rate" else
             f"kappa={lat.kappa / LOG2:.4g} bits")
  latent = (f"latent on (H={lat.num_bits}, {kl_term})" if lat.enabled else
            "latent off (baseline)")
  lines = [f"model: {metrics_lib.count_params(state.params):,} parameters; {latent}"]
  if trainer.mesh.devices.size > 1:
    replicated = sharding.replicated_fraction(state.params, trainer.state_sharding.params)
    lines.append(f"mesh {dict(trainer.mesh.shape)}: {100 * replicated:.1f}% of the parameter "
                 "bytes replicated on every device")
  return lines


def _free_space_warning(directory, keep, checkpoint_bytes):
  """A warning line when `directory` has room for fewer than `keep` + 1 checkpoints (the newest
  `keep` and the one being written), each estimated at the state's uncompressed bytes; none for
  a bucket (no fixed size)."""
  import shutil
  if storage.is_url(directory):
    return None
  free = shutil.disk_usage(directory).free
  need = (keep + 1) * checkpoint_bytes
  if free >= need:
    return None
  gb = lambda x: f"{x / 1e9:.3g} GB"
  return (f"warning: {gb(free)} free in {directory}, but checkpoint.keep={keep} + 1 checkpoints "
          f"of about {gb(checkpoint_bytes)} each (the train state's bytes) need {gb(need)}: "
          "a save may fail for lack of space")


class Preempted(Exception):
  """Raised by the SIGTERM/SIGINT handler while `_Preemption.raise_now` is set (sampling)."""


class _Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop polls (between steps and evaluation batches): it
  saves a checkpoint and exits cleanly. With `raise_now` set (after the last save: sampling) the
  signal raises `Preempted` at once instead."""

  def __init__(self):
    self.requested = False
    self.raise_now = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True
    if self.raise_now:
      raise Preempted()

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class StepTrace:
  """A JAX profiler trace of the steps in train.profile_steps, written to `directory`: started
  before the first of them that this run makes, stopped once the last one's outputs are ready,
  or when the loop ends early (a context manager: no trace is left running on an error)."""

  def __init__(self, t, directory: str, log: Callable):
    self.first, self.last = profile_steps(t) or (0, -1)
    self.directory, self._log = directory, log
    self._since = self._latest = None  # the first and the newest step traced, while tracing

  def __enter__(self):
    return self

  def before(self, step: int) -> None:
    """Called before step `step` (counted from 1) runs."""
    if self._since is None and self.first <= step <= self.last:
      jax.profiler.start_trace(self.directory)
      self._since = step

  def after(self, step: int, outputs) -> None:
    """Called after step `step` was dispatched; `outputs` are its results."""
    if self._since is not None:
      self._latest = step
      if step >= self.last:
        jax.block_until_ready(outputs)
        self.stop()

  def stop(self) -> None:
    if self._since is None:
      return
    since, self._since = self._since, None
    jax.profiler.stop_trace()
    self._log(f"profile of steps {since}-{self._latest} in {self.directory} (TensorBoard's "
              "profile plugin or XProf: its .xplane.pb; Perfetto: its .trace.json.gz)")

  def __exit__(self, kind, error, traceback):
    try:
      self.stop()
    except Exception as e:  # noqa: BLE001 (the error in flight is the one to report)
      if error is None:
        raise
      error.add_note(f"the profile in {self.directory} may be incomplete ({e})")


def _check_nonfinite(state, cfg, manager):
  """The count of skipped non-finite steps; raises NonFiniteError under on_nonfinite="stop"."""
  count, first = (int(x) for x in distributed.fetch(
      (state.nonfinite_steps, state.first_nonfinite_step)))
  if not count:
    return 0
  if cfg.train.on_nonfinite == "stop":
    steps = manager.all_steps()
    raise NonFiniteError(
        f"non-finite loss or gradients at step {first}; stopped (train.on_nonfinite=stop). "
        + (f"The newest checkpoint, step {steps[-1]}, is from before it." if steps else
           "No checkpoint was written."))
  return count


class ThroughputMeter:
  """Tokens/s between host-synced points. After anything that is not training (compilation,
  evaluation, a save) call `restart`: the next step syncs once and the clock starts there."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self._since: Optional[tuple] = None  # (time, step)

  def restart(self) -> None:
    self._since = None

  def start_if_stopped(self, state, step: int) -> None:
    if self._since is None:
      jax.block_until_ready(state)
      self._since = (time.perf_counter(), step)

  def lap(self, step: int) -> Optional[float]:
    """Tokens/s from the last lap (or start) to `step` (its metrics just fetched); None when no
    step was timed."""
    now = time.perf_counter()
    since_time, since_step = self._since
    self._since = (now, step)
    if step <= since_step:
      return None
    return (step - since_step) * self.tokens_per_step / max(now - since_time, 1e-9)


@dataclasses.dataclass(frozen=True)
class Due:
  """What the loop does after a step."""
  log: bool
  eval: bool
  save: bool

  @classmethod
  def after(cls, done: int, end: int, cfg) -> "Due":
    t, c = cfg.train, cfg.checkpoint
    # Step 1 is always logged: its metrics are those of the initial parameters (step-0 KL).
    return cls(log=done % t.log_every == 0 or done == end or done == 1,
               eval=done % t.eval_every == 0 or done == end,
               save=bool(c.every_steps) and done % c.every_steps == 0)


def train_and_evaluate(cfg, workdir: str, log: Callable = print, stop_at: Optional[int] = None,
                       trainer: Optional[Trainer] = None):
  """Trains a resolved config in `workdir`; resumes from its newest readable checkpoint.
  Returns the final TrainState. `trainer` reuses compiled steps built for a config that differs
  from `cfg` at most in κ and the target rate (traced values of the state; `launch.sweep
  --in_process`).

  Checkpoints: every `checkpoint.every_steps` steps and `checkpoint.every_seconds` seconds
  (async), at the end, and on SIGTERM/SIGINT (then the function returns early). `stop_at` ends
  the run at that step with a checkpoint, as a preemption would; the schedule stays that of
  `train.steps`.
  """
  from ftjax import checkpoint as ckpt_lib, run  # orbax is heavy to import; only the loop needs it

  ckpt_lib.require_storage(workdir)
  if jax.process_index() != 0:  # one process logs and writes files; all of them compute
    log = lambda *_: None
  else:
    if cfg.checkpoint.verify:  # the run's own tokenizer, read below, is the one it trained with
      run.verify_run_files(workdir, skip=(run.CONFIG_FILE,))
    run.write_config(workdir, cfg)
  trainer = trainer or Trainer.create(cfg, run_dir=workdir)
  preflight.check_before_training(trainer, workdir)  # nothing is compiled before this
  if jax.process_index() == 0:
    from ftjax.data import tokenizers
    try:
      if trainer.source.tokenizer is not None:
        tokenizers.save_with_run(trainer.source.tokenizer, workdir)
      run.write_run_checksums(workdir)
    except OSError as e:
      raise metrics_lib.write_error(workdir, e) from None
  t, c = cfg.train, cfg.checkpoint
  manager = ckpt_lib.Manager(run.checkpoints_dir(workdir), cfg, log=log)
  stream = trainer.stream("train")
  state, data_state = manager.restore_or(trainer.init_state, trainer.abstract_state())
  state = train.set_latent_targets(state, cfg.model.latent, trainer.state_sharding)
  warning = _free_space_warning(manager.directory, c.keep,
                                ckpt_lib.state_bytes(trainer.abstract_state()))
  if warning:
    log(warning)
  if data_state is not None:
    stream.set_state(data_state)
  start = int(state.step)
  if start:
    log(f"resumed from step {start}")
    changes = config_changes(manager.saved_config(start), cfg)
    if changes:  # e.g. more steps; a change of shape would have failed the restore
      log(f"the config differs from step {start}'s: " + "; ".join(changes))
  for line in _describe(cfg, trainer, state):
    log(line)
  peak = t.peak_flops or metrics_lib.measure_matmul_peak(jnp.dtype(cfg.model.dtype))
  flops_per_token = metrics_lib.flops_per_token(cfg.model)
  tokens_per_step = t.batch_size * cfg.model.seq_len
  # On a bucket the growing files (metrics, TensorBoard, wandb, traces) are written to a local
  # mirror and uploaded whole at each log and evaluation and when the loop ends.
  mirror = storage.LocalMirror(workdir, fetch=("metrics.jsonl", run.WANDB_ID_FILE),
                               error=lambda e, step: metrics_lib.write_error(workdir, e, step))
  local = mirror.path
  evaluate_first = distributed.any_process(start > 0 and Due.after(start, t.steps, cfg).eval and
                                           not _has_eval_row(local, start))[0]
  writer = metrics_lib.MetricWriter(local, resume_step=start,
                                    trackers=trackers.start(cfg, local, start, log))
  meter = ThroughputMeter(tokens_per_step)
  reported_nonfinite = 0
  pending = None  # (step, device metrics): fetched one step late, so the step never syncs
  last_save = time.monotonic()

  def flush():
    """Fetches and logs the pending step's metrics."""
    nonlocal pending
    step, device_metrics = pending
    pending = None
    row = distributed.fetch(device_metrics)
    rate = meter.lap(step)
    if rate is not None:
      row.update(tokens_per_sec=rate, mfu=rate * flops_per_token / peak)
    writer.write(step, row)
    mirror.sync(step)
    log(format_progress(step, t.steps, row, tokens_per_step))

  def evaluate(step):
    """Evaluates and logs the current parameters as those of `step`; False when a signal ended
    the evaluation first."""
    ev = trainer.evaluate(state.params,
                          stop=lambda: distributed.any_process(preemption.requested)[0])
    if ev is None:
      return False
    writer.write(step, ev)
    mirror.sync(step)
    log(format_eval(step, ev))
    return True

  end = t.steps if stop_at is None else min(stop_at, t.steps)
  finished = start  # the newest step whose state and data-stream position are both in hand
  with (mirror, writer, _Preemption() as preemption,
        StepTrace(t, os.path.join(local, run.PROFILE_DIR), log) as trace):
    try:
      if evaluate_first:  # the run before was stopped during this step's evaluation
        evaluate(start)
      for step in range(start, end):
        manager.check()  # a save that failed in the background ends the run now
        if step == start:
          log("compiling the train step…")
          compile_start = time.perf_counter()
        finished = None  # while the stream is read and the old state donated
        trace.before(step + 1)
        state, device_metrics = trainer.train_step(state, trainer.to_global(next(stream)))
        done = finished = step + 1
        trace.after(done, (state, device_metrics))
        if pending is not None:
          flush()
        meter.start_if_stopped(state, done)
        if step == start:
          log(f"compiled and ran the first step in {time.perf_counter() - compile_start:.1f} s")
        due = Due.after(done, end, cfg)
        if due.log:
          pending = (done, device_metrics)
        preempted = timed_save = False
        if jax.process_count() == 1 or due.log:  # multi-process: agree at log steps only
          preempted, timed_save = distributed.any_process(
              preemption.requested,
              bool(c.every_seconds) and time.monotonic() - last_save >= c.every_seconds)
        save = due.save or timed_save or preempted
        if (due.eval or save) and pending is not None:
          flush()
        if due.log or due.eval or save:
          count = _check_nonfinite(state, cfg, manager)
          if count > reported_nonfinite:
            log(f"warning: {count} step(s) with non-finite loss or gradients skipped so far "
                f"(the first at step {int(state.first_nonfinite_step)})")
            reported_nonfinite = count
        if due.eval and not preempted:
          if not evaluate(done):  # a signal during the evaluation: save now, evaluate on resuming
            preempted = save = True
          meter.restart()
        if save:
          manager.save(done, state, stream.get_state())
          last_save = time.monotonic()
          meter.restart()
        if preempted:
          manager.wait()
          log(_stopped(f"at step {done}"))
          return state
      if pending is not None:
        flush()
      _check_nonfinite(state, cfg, manager)
      manager.save(int(state.step), state, stream.get_state())
    except Exception as e:
      _save_after_error(e, manager, state, stream, finished, start, cfg)
      raise
    finally:
      try:
        manager.close()
      finally:
        stream.close()
    done = int(state.step)
    if preemption.requested:  # during the last save
      log(_stopped(f"at step {done}"))
    elif t.num_samples and jax.process_count() > 1:
      log("samples are printed by single-process runs only")
    elif t.num_samples:
      preemption.raise_now = True  # the checkpoint is complete: a signal ends sampling at once
      try:
        samples = show_samples(trainer, state.params, t.num_samples, log)
        writer.write_text(done, "samples",
                          "\n".join([samples, *_end_of_run(t, trainer, state, workdir, log)]))
      except Preempted:
        log(_stopped(f"while sampling after step {done}") + " (it samples again)")
        return state
      except Exception as e:
        e.add_note(f"step {done} is saved: run the same command to resume (it samples again)")
        raise
      finally:
        preemption.raise_now = False
  log(f"outputs in {workdir}: " + ", ".join(_outputs(cfg, done)))
  return state


def _stopped(where):
  return f"stopped by a signal {where}: checkpoint saved; run the same command to resume"


def _outputs(cfg, step):
  """The run directory's outputs, for the last log line."""
  from ftjax import run
  named = {"tensorboard": f"{run.TB_DIR}/ (TensorBoard)",
           "wandb": f"{run.WANDB_DIR}/ (wandb, id in {run.WANDB_ID_FILE})"}
  return ([run.CONFIG_FILE, "metrics.jsonl"] + [named[n] for n in tracker_names(cfg.train)] +
          [f"{run.PROFILE_DIR}/ (profiler traces)"] * bool(profile_steps(cfg.train)) +
          [f"{run.CHECKPOINTS_DIR}/ (step {step})"])


def _has_eval_row(workdir, step):
  """Whether metrics.jsonl holds the evaluation of `step` (process 0 reads; others say no)."""
  if jax.process_index() != 0:
    return False
  return any(r.get("step") == step and any(k.startswith("eval_") for k in r)
             for r in metrics_lib.read_rows(workdir))


def _save_after_error(error, manager, state, stream, finished, start, cfg):
  """Saves the state of step `finished` (if training got past `start` and the state can be
  trusted) before `error` ends the run, and adds a note to `error` saying what was kept.

  Not tried with several processes (a save is collective: the others may still be training), for
  a failed save, a full disk or a failed upload to the run's bucket (the storage is the problem),
  without a consistent stream position, or after non-finite steps under train.on_nonfinite=stop."""
  full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
  bucket_failed = isinstance(error, WriteError) and storage.is_url(manager.directory)
  if (finished is None or finished <= start or jax.process_count() > 1 or full or bucket_failed
      or isinstance(error, (SaveError, NonFiniteError))):
    return
  try:
    if cfg.train.on_nonfinite == "stop" and int(jax.device_get(state.nonfinite_steps)):
      return
    manager.save(finished, state, stream.get_state())
    manager.wait()
  except Exception as e:  # noqa: BLE001 (the first error is the one to report)
    error.add_note(f"the train state of step {finished} could not be saved ({e})")
    return
  error.add_note(f"step {finished} is saved: run the same command to resume from it")


def sample_texts(trainer: Trainer, params, num_samples: int, key: jax.Array,
                 temperature: float = 1.0) -> list:
  """`num_samples` sequences from the source's prompts to the training length, Z uniform per
  token (KV-cache decoding), decoded to text."""
  cfg = trainer.cfg
  prompts_BP = jnp.asarray(trainer.source.prompts(num_samples))
  out = sampling.generate(make_model(cfg.model, decode=True), params, prompts_BP,
                          jnp.zeros((num_samples,), jnp.int32), key,
                          max_new_tokens=cfg.model.seq_len + 1 - prompts_BP.shape[1],
                          temperature=temperature)
  return [trainer.source.decode(row) for row in np.asarray(out["tokens"])]


def _end_of_run(t, trainer: Trainer, state, workdir: str, log: Callable) -> list[str]:
  """Logs and returns the lines of the train.end_of_run hook of `t` (none without one)."""
  hook = configs.end_of_run_hook(t)
  lines = list(hook(trainer, state, workdir) or []) if hook is not None else []
  for line in lines:
    log(line)
  return lines


def show_samples(trainer: Trainer, params, num_samples: int, log: Callable = print,
                 temperature: float = 1.0) -> str:
  """Logs samples (Z uniform per token); for the synthetic task also the share well-formed."""
  from ftjax.data import synthetic
  cfg = trainer.cfg
  texts = sample_texts(trainer, params, num_samples, jax.random.key(cfg.seed + 2), temperature)
  log(f"samples (Z uniform per token, temperature {temperature}):")
  for s in texts:
    log("  " + s.replace("\n", "\\n"))
  if trainer.source.name == "synthetic":
    log(f"well-formed: {sum(synthetic.well_formed(texts, cfg.data.block_len))}/{len(texts)}")
  return "\n".join(texts)
