"""How a run ends when it does not simply finish: the exception that reaches the user as a
message, not a traceback, and the exit statuses `cvjax.main` gives."""

# EX_TEMPFAIL of sysexits.h ("try again later"): stopped by SIGTERM/SIGINT after saving a
# checkpoint; re-running the same command resumes.
PREEMPTED_EXIT_CODE = 75


class UserError(Exception):
  """Bad input from the user: a config value, a dataset, a workdir.

  `cvjax.main` prints the message as one paragraph and exits non-zero; the
  message must say what was wrong and what was expected.
  """
