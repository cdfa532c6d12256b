"""The one exception type that reaches the user as a message, not a traceback."""


class UserError(Exception):
  """Bad input from the user: a config value, a dataset, a workdir.

  `cvjax.main` prints the message as one paragraph and exits non-zero; the
  message must say what was wrong and what was expected.
  """
