"""Errors that end a run with one line. Every module that raises them imports them from here, so
this module imports nothing of ftjax."""


class ConfigError(ValueError):
  """A config value that cannot run; the message names the key."""

  def __init__(self, key, message):
    super().__init__(f"config error: {key}: {message}")
    self.key = key
