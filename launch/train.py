"""Train a Free Transformer (or its baseline).

  python -m launch.train --config=experiments/synthetic.py --workdir=runs/synthetic \
      [--config.model.latent.kappa_bits=0.5 ...]

Writes DIR/config.json, DIR/metrics.jsonl, TensorBoard files under DIR/tb and orbax checkpoints
under DIR/checkpoints; resumes from the newest checkpoint in DIR.
"""

import logging as logging_std
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds a "
                               "checkpoint).")
_DISTRIBUTED = cli.DistributedFlags()
_CONFIG_HELP = flags.DEFINE_bool("config_help", False, "Print every config key (override with "
                                  "--config.<key>=value) with its default and meaning, and exit.")
_STOP_AT = flags.DEFINE_integer("stop_at", None, "Stop at this step with a checkpoint, as a "
                                "preemption would (the schedule stays that of train.steps).")


class _NoOrbaxErrors(logging_std.Filter):
  """Drops orbax's error records (a traceback per failed thread or future): the launcher reports
  a failed save itself, in one line."""

  def filter(self, record):
    return not (record.levelno >= logging_std.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _exit_now(message, status):
  """Prints one line and ends the process at once: orbax's and jax's background threads (and the
  runtime's shutdown barrier, with a lost peer) would otherwise print tracebacks or wait."""
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)


def _with_notes(error):
  """The error's message and the loop's notes on it (which step was saved), in one line."""
  return "; ".join([str(error), *getattr(error, "__notes__", ())])


def main(argv):
  cli.no_extra_args(argv)
  if _CONFIG_HELP.value:
    cli.print_config_help()
    return
  if not _WORKDIR.value:
    cli.fail("flag error: --workdir is required")
  cli.check_paths(runs=[("workdir", _WORKDIR.value)])
  _DISTRIBUTED.check()
  cfg = cli.resolved_config(_CONFIG)
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO
  logging.get_absl_handler().addFilter(_NoOrbaxErrors())
  from ftjax import checkpoint, distributed, loop, run  # after flag parsing: `--help` and errors stay fast
  from ftjax.configs import ConfigError
  from ftjax.data.text import CorpusError
  from ftjax.metrics import WriteError
  _, processes = _DISTRIBUTED.start(cfg.distributed.peer_timeout_seconds)
  watchdog = None
  if processes > 1:  # a lost peer ends this process within the timeout, with one line
    distributed.set_lost_note(lambda: run.newest_note(_WORKDIR.value))
    watchdog = distributed.PeerWatchdog(cfg.distributed.peer_timeout_seconds).start()
  try:
    loop.train_and_evaluate(cfg, _WORKDIR.value, stop_at=_STOP_AT.value)
  except ConfigError as e:  # found at start-up (mesh, divisibility, eval and sample settings)
    cli.fail(_with_notes(e))
  except CorpusError as e:  # missing, unprepared or corrupt data
    cli.fail(f"data error: {_with_notes(e)}")
  except checkpoint.CheckpointError as e:  # e.g. the run's checkpoints do not match a changed config
    cli.fail(f"checkpoint error: {_with_notes(e)}")
  except loop.NonFiniteError as e:
    cli.fail(f"training stopped: {e}", status=1)
  except WriteError as e:  # disk full, quota, permissions: the run cannot keep its results
    _exit_now(f"error: {_with_notes(e)}", 1)
  except Exception:
    if watchdog is not None:  # a collective failed: a lost peer? (the watchdog then ends it)
      watchdog.lost()
    raise
  if watchdog is not None:
    watchdog.stop()


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
