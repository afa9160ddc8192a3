"""Experiment trackers: where `metrics.MetricWriter` sends each row of metrics.jsonl besides the
file, with the resolved config and the run name (`train.trackers`).

A tracker has `write(step, row)`, `write_text(step, tag, text)` and `close(failed)`. TensorBoard
(tensorboardX, synchronous) raises WriteError when a row cannot be written, as metrics.jsonl
does. wandb is optional (`pip install wandb`): the start-up checks require it importable when it
is named; once the run trains, a wandb failure is one warning line and wandb stops, the run goes
on. Its run id is kept in RUN/wandb_id.txt, so a resumed run continues the same wandb run.
"""

import html
import json
import os
import secrets
import time
from typing import Callable

import jax

from ftjax.configs import tracker_names
from ftjax.errors import ConfigError
from ftjax.metrics import write_error

WANDB_INSTALL = "pip install wandb==0.31.0"


def start(cfg, workdir: str, step: int, log: Callable) -> list:
  """The trackers of cfg.train.trackers, started at `step` (none but on process 0)."""
  if jax.process_index() != 0:
    return []
  made = {"tensorboard": TensorBoard, "wandb": Wandb}
  trackers = [made[name](cfg, workdir, step, log) for name in tracker_names(cfg.train)]
  return [tracker for tracker in trackers if tracker.started]


def require_installed(cfg) -> None:
  """ConfigError (one line) when a tracker named in cfg.train.trackers cannot be imported."""
  if "wandb" in tracker_names(cfg.train):
    _import_wandb()


def _import_wandb():
  try:
    import wandb
  except ImportError as e:
    raise ConfigError("train.trackers", f"wandb is named but cannot be imported ({e}): "
                      f"{WANDB_INSTALL}, or leave it out") from None
  return wandb


def run_name(cfg, workdir: str) -> str:
  return cfg.train.run_name or os.path.basename(os.path.abspath(workdir))


class TensorBoard:
  """Event files under RUN/tb; the resolved config as a text summary at the start step."""

  def __init__(self, cfg, workdir, step, log):
    del log
    from tensorboardX.event_file_writer import EventsWriter
    from ftjax import run
    self.started = True
    self._dir = os.path.join(workdir, run.TB_DIR)
    try:
      os.makedirs(self._dir, exist_ok=True)
      self._tb = EventsWriter(os.path.join(self._dir, "events"))
    except OSError as e:
      raise write_error(self._dir, e) from None
    self.write_text(step, "config", "    " + cfg.to_json_best_effort(indent=2, sort_keys=True)
                    .replace("\n", "\n    "))  # indented: shown as a code block

  def _event(self, step, summary):
    from tensorboardX.proto.event_pb2 import Event
    try:
      self._tb.write_event(Event(summary=summary, step=int(step), wall_time=time.time()))
      self._tb.flush()
    except OSError as e:
      raise write_error(self._dir, e, step) from None

  def write(self, step, row):
    from tensorboardX.proto.summary_pb2 import Summary
    self._event(step, Summary(value=[Summary.Value(tag=k, simple_value=v)
                                     for k, v in row.items() if k != "step"]))

  def write_text(self, step, tag, text):
    from tensorboardX.summary import text as text_summary
    self._event(step, text_summary(tag, text))

  def close(self, failed=False):
    del failed
    try:
      self._tb.close()
    except OSError:
      pass


class Wandb:
  """A wandb run named after the run directory, its id in RUN/wandb_id.txt (resumed with
  resume="allow"), files under RUN/wandb, the config as its config, rows against a "step" axis
  (a resumed run's repeated steps are logged again, as metrics.jsonl rewrites them)."""

  def __init__(self, cfg, workdir, step, log):
    self._log, self._run = log, None
    try:
      self._wandb = _import_wandb()
      self._run = self._wandb.init(project=cfg.train.wandb_project, name=run_name(cfg, workdir),
                                   id=_wandb_id(workdir), resume="allow",
                                   dir=workdir)
      self._run.config.update(json.loads(cfg.to_json_best_effort()), allow_val_change=True)
      self._run.define_metric("step")
      self._run.define_metric("*", step_metric="step")
    except Exception as e:  # noqa: BLE001 (wandb raises its own kinds; the run goes on)
      self._stop("did not start", e, step)

  @property
  def started(self):
    return self._run is not None

  def write(self, step, row):
    self._log_data(step, row)  # row["step"] is the x axis

  def write_text(self, step, tag, text):
    self._log_data(step, {"step": int(step),
                          tag: self._wandb.Html(f"<pre>{html.escape(text)}</pre>")})

  def _log_data(self, step, data):
    if self._run is not None:
      try:
        self._run.log(data)
      except Exception as e:  # noqa: BLE001
        self._stop("failed", e, step)

  def _stop(self, what, error, step):
    """One warning line; wandb is closed and the run goes on without it."""
    first = (str(error).splitlines() or [""])[0]
    self._log(f"warning: wandb {what} at step {step} ({type(error).__name__}: {first}); the run "
              "goes on without it (metrics.jsonl holds every row)")
    self.close(failed=True)

  def close(self, failed=False):
    run, self._run = self._run, None
    if run is not None:
      try:
        run.finish(exit_code=int(failed))
      except Exception as e:  # noqa: BLE001 (the run's own files are complete)
        self._log(f"warning: wandb did not finish ({e})")


def _wandb_id(workdir):
  """The run's wandb id: read from RUN/wandb_id.txt, or made and written there."""
  from ftjax import run
  path = os.path.join(workdir, run.WANDB_ID_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return f.read().strip()
  run_id = secrets.token_hex(4)
  with open(path, "w", encoding="utf-8") as f:
    f.write(run_id + "\n")
  return run_id
