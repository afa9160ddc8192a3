"""Shared command-line plumbing: flag parsing, config resolution, and `run`, which turns the
errors of ftjax.errors into one line and an exit status."""

import os
import sys

from absl import app, flags, logging

from ftjax.configs import resolve
from ftjax.errors import FtjaxError, StorageError


def fail(message, status=2):
  """Prints one line to stderr and exits (status 2: bad flags or config)."""
  print(message, file=sys.stderr)
  sys.exit(status)


def exit_now(message, status):
  """Prints one line and ends the process at once: orbax's and jax's background threads (and the
  runtime's shutdown barrier, with a lost peer) would otherwise print tracebacks or wait."""
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)


def run(main, exit_at_once=()):
  """A launcher's `app.run(main)` (flags through `parse_flags`): an FtjaxError from `main` ends
  the process with its one line (`FtjaxError.line`: prefix, message, notes) on stderr and its exit
  status; through `exit_now` for the error types in `exit_at_once`."""

  def one_line_errors(argv):
    try:
      return main(argv)
    except FtjaxError as e:
      (exit_now if isinstance(e, exit_at_once) else fail)(e.line(), e.status)

  app.run(one_line_errors, flags_parser=parse_flags)


def script():
  """The installed commands (`[project.scripts]` in pyproject.toml: ftjax-train, ftjax-sample,
  ftjax-prepare-data, ...): runs the launcher the command is named after, as `python -m
  launch.<name>` does."""
  import runpy
  name = os.path.basename(sys.argv[0]).removeprefix("ftjax-").replace("-", "_")
  runpy.run_module(f"launch.{name}", run_name="__main__", alter_sys=True)


def config_path(path):
  """`path` when it is a file; else the experiment config it names in the installed
  `experiments` package ("experiments/synthetic_z.py", "synthetic_z.py" or "synthetic_z"), so
  that a launcher run outside the repository finds the shipped configs; else `path` unchanged
  (the loader then reports it)."""
  file, sep, suffix = str(path).partition(":")  # config_flags: "file.py:argument"
  if os.path.isfile(file):
    return path
  import importlib.util
  spec = importlib.util.find_spec("experiments")
  name = os.path.basename(file).removesuffix(".py") + ".py"
  for folder in (spec.submodule_search_locations or []) if spec else []:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name) + sep + suffix
  return path


def parse_flags(argv):
  """absl flag parser for `app.run(..., flags_parser=parse_flags)`: a bad flag or config
  override exits 2 with one line instead of absl's usage dump. `--config=` names an experiment
  file or a shipped config (`config_path`)."""
  argv = [f"--config={config_path(a[len('--config='):])}" if a.startswith("--config=") else a
          for a in argv]
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"flag error: {e}".splitlines()[0])
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # raised by config overrides
    unknown = isinstance(e, KeyError) or (e.args and isinstance(e.args[0], KeyError))
    fail(("config error: unknown key " if unknown else "config error: ") + _as_text(e))


def _as_text(error):
  """One line of an exception's message as text (KeyError's str() is the quoted repr)."""
  while error.args and isinstance(error.args[0], BaseException):  # a KeyError in an AttributeError
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  text = text.encode().decode("unicode_escape") if "\\n" in text or "\\'" in text else text
  lines = [line.strip(" '\"") for line in text.splitlines() if line.strip()]
  return ": ".join(lines[:1] + [" ".join(lines[1:])] if len(lines) > 1 else lines)


def resolved_config(config_flag):
  """The validated config from a `config_flags` flag; exits 2 when the file does not load (a
  ConfigError is left to `run`)."""
  if config_flag.value is None:
    fail("flag error: --config=experiments/<name>.py is required")
  try:
    return resolve(config_flag.value)
  except OSError as e:  # config_flags defers a failed load of the file to the first access
    reason = str(e).strip().splitlines()[-1].strip()
    fail(f"config error: cannot load the --config file: {reason}")


def print_config_help():
  """Every config key with its default and comment (`--config_help`)."""
  from ftjax.configs import key_help
  rows = key_help()
  width = max(len(k) for k, _, _ in rows)
  for key, value, comment in rows:
    print(f"{key:<{width}}  {value!r:<14}  {comment}")


def check_paths(inputs=(), outputs=(), directories=(), others=(), runs=(), buckets_ok=(),
                globs=()):
  """Exits 2 with one line unless every (flag, path) of `inputs` is a readable file, every
  output's folder exists, no `directories` path is an existing file, and no path of these or of
  `others` is a URL. `runs` (run directories), `buckets_ok` (other directories that ftjax reads
  and writes through `ftjax.storage`) and `globs` (input patterns) may also be gs:// or s3://
  URLs; the bucket of a `buckets_ok` or `globs` URL is reached here (a run's when the run is
  opened). Empty paths pass."""
  from ftjax import storage
  from ftjax.configs import url_error
  for flag, path in (*inputs, *outputs, *directories, *others):
    if url_error(path):
      fail(f"flag error: --{flag}={url_error(path)}")
  for flag, path in (*runs, *buckets_ok, *globs):
    if storage.unsupported(path):
      fail(f"flag error: --{flag}={storage.unsupported(path)}")
  for flag, path in (*runs, *buckets_ok):
    if path and not storage.is_url(path) and os.path.isfile(path):
      fail(f"flag error: --{flag}={path}: exists and is not a directory")
  for flag, path in (*buckets_ok, *globs):
    if storage.is_url(path):
      logging.set_verbosity(logging.WARNING)  # botocore and gcsfs log each request at INFO
    try:
      storage.use_bucket(path)
    except StorageError as e:
      fail(f"flag error: --{flag}={path}: {e}")
  for flag, path in inputs:
    if path and not os.path.isfile(path):
      fail(f"flag error: --{flag}={path}: no such file")
  for flag, path in outputs:
    folder = os.path.dirname(os.path.abspath(path)) if path else ""
    if path and (os.path.isdir(path) or not os.path.isdir(folder)):
      fail(f"flag error: --{flag}={path}: " + ("is a directory" if os.path.isdir(path) else
                                               f"the folder {folder} does not exist"))
  for flag, path in directories:
    if path and os.path.exists(path) and not os.path.isdir(path):
      fail(f"flag error: --{flag}={path}: exists and is not a directory")


def parse_mesh(text):
  """{axis: size} of a --mesh flag such as "fsdp=4,tensor=2"; exits 2 on a bad item."""
  sizes = {}
  for item in filter(None, text.split(",")):
    axis, _, size = item.partition("=")
    if axis not in ("data", "fsdp", "tensor") or not size.lstrip("-").isdigit():
      fail(f"flag error: --mesh item {item!r}: expected data|fsdp|tensor=<int>")
    sizes[axis] = int(size)
  return sizes


def define_restore_mesh():
  """The --mesh flag of the launchers that restore a run (sample, evaluate, export_hf, lm_eval)."""
  return flags.DEFINE_string("mesh", "", "Devices to restore the run onto, e.g. fsdp=4,tensor=2 "
                             "(axes not named: 1; default: one device).")


def no_extra_args(argv):
  if len(argv) > 1:
    fail(f"flag error: unexpected arguments {argv[1:]}")


def _read_only_notices(record):
  """False for orbax's warnings that a checkpoint directory opened read-only is read-only."""
  message = record.getMessage()
  return not ("read_only=True" in message or "Given directory is read only" in message)


def restored_run(argv, workdir, step, mesh=""):
  """`ftjax.run.Inference` of the run in `workdir` (config, model, parameters, text codec; the
  training data is not opened), restored onto one device or the `mesh` flag's devices, for the
  launchers that sample or export; exits 2 with one line on bad flags or (under `run`) a
  missing/unreadable run."""
  from ftjax import run  # after flag checks: errors stay fast
  return _restore(argv, workdir, mesh, lambda mesh_: run.load_for_inference(workdir, step, mesh_))


def restored_trainer(argv, workdir, step, mesh=""):
  """(trainer, state) of the run in `workdir` (parameters only) with its data source, for the
  launchers that evaluate on the run's data; exits 2 as `restored_run` does."""
  from ftjax.trainer import load_run
  return _restore(argv, workdir, mesh, lambda mesh_: load_run(workdir, step, mesh=mesh_))


def _restore(argv, workdir, mesh, load):
  no_extra_args(argv)
  mesh = parse_mesh(mesh)
  if not workdir:
    fail("flag error: --workdir is required")
  check_paths(runs=[("workdir", workdir)])
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO
  import logging as py_logging
  py_logging.getLogger("absl").addFilter(_read_only_notices)  # orbax on reading a run: expected
  return load(mesh)  # a missing or damaged run, or its data: one line (`run`)


class DistributedFlags:
  """A launcher's multi-process flags (--coordinator_address, --num_processes, --process_id,
  --multiprocess), defined at import time of the launcher that makes one."""

  def __init__(self):
    self._coordinator = flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0, for multi-process runs outside "
        "SLURM/TPU VMs.")
    self._num = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
    self._id = flags.DEFINE_integer("process_id", None, "This process's index.")
    self._auto = flags.DEFINE_bool("multiprocess", False, "Start jax.distributed and let jax "
                                   "detect the cluster (TPU VM slices); SLURM is detected anyway.")

  def check(self):
    """Exits with one line when the process id and count do not fit together."""
    num, pid = self._num.value, self._id.value
    if num is not None and not (num >= 1 and 0 <= (pid or 0) < num):
      fail(f"flag error: --process_id must be in 0..{num - 1} and --num_processes >= 1, got "
           f"{pid} of {num}")

  def start(self, peer_timeout_seconds):
    """Starts jax.distributed when the flags (or SLURM) say so: (process index, count)."""
    from ftjax import distributed
    return distributed.initialize(self._coordinator.value, self._num.value, self._id.value,
                                  auto=self._auto.value,
                                  peer_timeout_seconds=peer_timeout_seconds)
