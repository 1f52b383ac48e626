"""The one base class of every error a user can fix: `main.py` prints its message as one line."""


class UserError(Exception):
  """A bad flag, config value, file or environment, with a message that says what to do."""
