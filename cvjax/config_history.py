"""A run's settings by step: WORKDIR/config.json holds the settings the run trains with now,
and WORKDIR/config_history.jsonl one line per resume that changed them,
`{"step": S, "changed": {"optimizer.learning_rate": {"was": 0.1, "now": 0.05}, ...}}`: steps
from S on ran with `now`, the steps before with `was`. A run resumed with its own settings adds
nothing; a fresh run (or one redone before its first checkpoint) has no history."""

import json

from absl import logging
from etils import epath

HISTORY = 'config_history.jsonl'


def _flat(tree, prefix=''):
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f'{prefix}{key}.').items()}
  return {prefix[:-1]: tree}


def changes(before, now):
  """{field: {'was': a, 'now': b}} between two configs as JSON dicts, by dotted field."""
  a, b = _flat(before), _flat(now)
  return {k: {'was': a.get(k), 'now': b.get(k)} for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)}


def _completed(saved):
  """A saved config.json with the fields it lacks at configs/common.py's defaults."""
  from configs import common  # pylint: disable=g-import-not-at-top
  return json.loads(common.complete(saved).to_json_best_effort())


def write_config(folder, config, step):
  """Writes FOLDER/config.json; at a resume (`step` > 0) first appends the settings that
  changed since the config.json there to FOLDER/config_history.jsonl."""
  folder = epath.Path(folder)
  path = folder / 'config.json'
  now = json.loads(config.to_json_best_effort())
  if step and path.exists():
    try:
      before = json.loads(path.read_text())
      # A field added to cvjax since that config.json was written ran at its default then.
      diff = changes(_completed(before), now) if isinstance(before, dict) else None
    except (ValueError, OSError) as e:
      logging.warning('%s could not be read (%s): the settings history notes that the settings '
                      'before step %d are unknown.', path, e, step)
      diff = None
    if diff is None or diff:
      entry = {'step': int(step), 'changed': diff if diff is not None else 'unknown: the '
               'previous config.json was unreadable'}
      history = folder / HISTORY
      old = history.read_text() if history.exists() else ''
      history.write_text(old + json.dumps(entry) + '\n')  # Object stores cannot append.
  path.write_text(config.to_json_best_effort(indent=2))
