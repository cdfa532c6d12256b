"""Defaults are said once, in configs/common.py: the library reads each field common.py sets as
an attribute, never `.get(field, default)` restating (or contradicting) its default, and a
config.json an older cvjax wrote gets the fields it lacks from common.py (configs.common.complete)."""

import ast
import os

from conftest import ROOT
from configs import common, resnet

# `.get(NAME, default)` calls in cvjax/ whose NAME is also a field of configs/common.py, left on
# purpose: (file, NAME) -> why.
ALLOWED = {
    # Plain dicts that are not configs.
    ('cvjax/sharding.py', 'model'): 'mesh.shape, the jax mesh\'s axis sizes',
    ('cvjax/tools/gpu_results.py', 'population'): 'a results record',
    ('cvjax/tools/report.py', 'seed'): 'config.json read as a plain dict; "-" in one place',
}


def _fields(d):
  for key, value in d.items():
    yield key
    if isinstance(value, dict):
      yield from _fields(value)


def _gets_with_a_default():
  for folder, _, files in os.walk(os.path.join(ROOT, 'cvjax')):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        with open(path) as f:
          tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
          if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == 'get' and len(node.args) == 2
              and isinstance(node.args[0], ast.Constant)):
            yield os.path.relpath(path, ROOT).replace(os.sep, '/'), node.args[0].value, node.lineno


def test_no_field_of_common_py_is_read_with_a_get_default():
  fields = set(_fields(common.base_config().to_dict())) - {'name'}  # model.name: the family's.
  found = [(f, n, line) for f, n, line in _gets_with_a_default()
           if n in fields and (f, n) not in ALLOWED]
  assert not found, (f'{found}: read these fields as attributes (configs/common.py sets them; '
                     'a saved config.json gets them from configs.common.complete)')


def test_the_check_finds_a_get_default():
  assert ('cvjax/sharding.py', 'model') in {(f, n) for f, n, _ in _gets_with_a_default()}


def test_complete_fills_what_an_older_config_json_lacks_and_keeps_the_rest():
  saved = resnet.get_config('resnet8').to_dict()
  del saved['train']['ema_decay'], saved['input']['alternate_flip'], saved['eval']
  saved['train']['batch_size'] = 7
  saved['train']['gone'] = 'kept'  # A field this cvjax no longer sets.
  saved['schedule']['boundaries'] = [0.3]  # JSON's list for a tuple.
  config = common.complete(saved)
  assert config.train.ema_decay == 0.0 and config.input.alternate_flip is False
  assert config.eval.to_dict() == common.base_config().eval.to_dict()
  assert (config.train.batch_size, config.train.gone) == (7, 'kept')
  assert list(config.schedule.boundaries) == [0.3]
  assert config.model.to_dict() == saved['model']  # Not merged with anything.


def test_a_resume_records_no_change_for_fields_added_since_at_their_defaults(tmp_path):
  """A config.json written before a field existed ran at that field's default: resuming it
  with the default is no change; with another value it is one."""
  import json  # pylint: disable=g-import-not-at-top
  from configs import resnet  # pylint: disable=g-import-not-at-top
  from cvjax import config_history  # pylint: disable=g-import-not-at-top
  config = resnet.get_config('resnet20')
  old = json.loads(config.to_json_best_effort())
  del old['input']['alternate_flip'], old['schedule']['triangle_end']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  config_history.write_config(tmp_path, config, 100)
  assert not (tmp_path / config_history.HISTORY).exists()
  config.optimizer.learning_rate = 0.05
  config_history.write_config(tmp_path, config, 200)
  line, = (tmp_path / config_history.HISTORY).read_text().splitlines()
  assert json.loads(line) == {'step': 200, 'changed': {
      'optimizer.learning_rate': {'was': 0.1, 'now': 0.05}}}
