"""A run's folder (its workdir) is a local path or a remote one (gs://..., any etils.epath
path); orbax, the metric writer and the reports write both. Light: the launcher imports it."""

import os


def is_remote(path):
  """Whether `path` names a remote folder (it has a scheme such as gs://)."""
  return '://' in os.fspath(path)


def as_path(path):
  """An etils.epath.Path: remote as it is, local made absolute."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path if is_remote(path) else os.path.abspath(path))
