"""Train a Free Transformer (or its baseline).

  python -m launch.train --config=experiments/synthetic.py --workdir=runs/synthetic \
      [--config.model.latent.kappa_bits=0.5 ...]

Writes DIR/config.json, DIR/metrics.jsonl, TensorBoard files under DIR/tb and orbax checkpoints
under DIR/checkpoints; resumes from the newest checkpoint in DIR.
"""

import logging as logging_std
import os

from absl import flags, logging
from ml_collections import config_flags

from ftjax.errors import FtjaxError, WriteError
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
  from ftjax import distributed, loop, run  # after flag parsing: `--help` and errors stay fast
  _, processes = _DISTRIBUTED.start(cfg.distributed.peer_timeout_seconds)
  watchdog = None
  if processes > 1:  # a lost peer ends this process within the timeout, with one line
    distributed.set_lost_note(lambda: run.newest_note(_WORKDIR.value))
    watchdog = distributed.PeerWatchdog(cfg.distributed.peer_timeout_seconds).start()
  try:
    loop.train_and_evaluate(cfg, _WORKDIR.value, stop_at=_STOP_AT.value)
  except FtjaxError:  # config, data, checkpoint, non-finite loss, a write: one line (cli.run)
    raise
  except Exception:
    if watchdog is not None:  # a collective failed: a lost peer? (the watchdog then ends it)
      watchdog.lost()
    raise
  if watchdog is not None:
    watchdog.stop()


if __name__ == "__main__":
  # A failed write (disk full, quota, permissions) ends the process at once: orbax's pending
  # writes would print tracebacks at interpreter shutdown.
  cli.run(main, exit_at_once=(WriteError,))
