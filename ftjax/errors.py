"""Errors that end a run with one line. Every module that raises them imports them from here, so
this module imports nothing of ftjax. A launcher prints `error.line()` and exits with
`error.status` (`launch.cli.run`)."""


class FtjaxError(Exception):
  """An error a launcher reports in one line: `prefix`, the message and the notes added to it
  (e.g. the loop's "step N is saved: ..."), then exit status `status`."""
  prefix = "error: "
  status = 1

  def line(self) -> str:
    return self.prefix + "; ".join([str(self), *getattr(self, "__notes__", ())])


class ConfigError(FtjaxError, ValueError):
  """A config value that cannot run; the message names the key."""
  prefix = ""  # the message starts with "config error:"
  status = 2

  def __init__(self, key, message):
    super().__init__(f"config error: {key}: {message}")
    self.key = key


class CorpusError(FtjaxError, RuntimeError):
  """A corpus that is missing or unreadable; the message says how to get it."""
  prefix = "data error: "
  status = 2


class CheckpointError(FtjaxError, RuntimeError):
  """A run directory without a usable checkpoint; the message names the directory."""
  prefix = "checkpoint error: "
  status = 2


class StorageError(FtjaxError, RuntimeError):
  """A bucket that cannot be reached (missing, no credentials, no such scheme); one line."""
  prefix = "storage error: "
  status = 2


class TokenizerError(FtjaxError, ValueError):
  """A tokenizer that cannot be loaded or used; the message says which and why."""
  prefix = "tokenizer error: "
  status = 2


class ChatTemplateError(FtjaxError, ValueError):
  """A chat template that is missing, unknown by name, or fails to render; one line."""
  prefix = "chat template error: "
  status = 2


class SlurmError(FtjaxError):
  """A SLURM command is missing or failed (one line: the command's last message)."""
  prefix = "sweep: "


class HFError(FtjaxError, ValueError):
  """A checkpoint ftjax cannot import as it is; the message (one line) names what and why."""
  prefix = "import error: "
  status = 2


class WriteError(FtjaxError, RuntimeError):
  """A file of the run could not be written (disk full, quota, permissions, I/O error); the
  message is one line naming the file, the cause and what to do."""


class SaveError(WriteError):
  """A checkpoint (or another file of the run) could not be written; the message is one line:
  the cause, the step not saved, the newest complete checkpoint and what to do."""


class NonFiniteError(FtjaxError, RuntimeError):
  """Raised by the loop with train.on_nonfinite="stop"; the message names the step."""
  prefix = "training stopped: "
