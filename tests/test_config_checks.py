"""Every rejection of a config's field or combination of fields is in cvjax/config_checks.py
(each model family checks its own `model` fields in its module), and runs before the data is
read: one place to read what a config may hold."""

import ast
import os
import re

import pytest

from conftest import ROOT, tiny_config
from configs import resnet
from cvjax import config_checks
from cvjax import experiment
from cvjax.errors import UserError

# A UserError whose message names a config field ('train.batch_size=...', 'unknown
# model.name=...'): where it may be raised besides config_checks.py and cvjax/models/.
ALLOWED = {
    'cvjax/data/__init__.py': 'dataset.pipeline, read where the pipeline is chosen '
                              '(pipeline_for, which tests call alone)',
    'cvjax/data/memory.py': 'dataset.name/path: what the loaders find (or not) on disk and in '
                            'tfds; input.normalization by the function that computes it',
    'cvjax/data/streaming.py': 'dataset.path: not a folder, found when the loader opens it',
    'cvjax/optim.py': 'optimizer.name and schedule.name, by the tables that build them',
    'cvjax/population.py': 'population.seeds and the parsing of population.vary',
    'cvjax/checkpointing.py': 'seed, against the checkpoint a run resumes',
    'cvjax/tools/ship.py': '--override names fields it may change',
}
FIELD = re.compile(r'\b(seed|(train|input|eval|mesh|optimizer|schedule|dataset|population|'
                   r'model)\.\w+)\b')


def _rejections_naming_a_field():
  for folder, _, files in os.walk(os.path.join(ROOT, 'cvjax')):
    for name in files:
      if not name.endswith('.py'):
        continue
      path = os.path.join(folder, name)
      with open(path) as f:
        tree = ast.parse(f.read(), path)
      for node in ast.walk(tree):
        if (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
            and getattr(node.exc.func, 'id', None) == 'UserError' and node.exc.args):
          message = node.exc.args[0]
          parts = message.values if isinstance(message, ast.JoinedStr) else [message]
          text = ''.join(p.value for p in parts
                         if isinstance(p, ast.Constant) and isinstance(p.value, str))
          if FIELD.search(text):
            yield os.path.relpath(path, ROOT).replace(os.sep, '/'), node.lineno


def test_config_rejections_are_in_config_checks_or_the_model_families():
  found = list(_rejections_naming_a_field())
  assert any(f == 'cvjax/config_checks.py' for f, _ in found)  # The scan finds them.
  elsewhere = [(f, line) for f, line in found if f != 'cvjax/config_checks.py'
               and not f.startswith('cvjax/models/') and f not in ALLOWED]
  assert not elsewhere, f'{elsewhere}: move these checks to cvjax/config_checks.py'


def test_check_config_rejects_every_eval_field_without_the_data():
  config = resnet.get_config('resnet8')
  config.eval.crops = 3
  with pytest.raises(UserError, match=r'eval.crops=3; expected 1 \(centre\) or 10'):
    config_checks.check_config(config, 1)


def test_the_pipeline_checks_run_before_the_data_is_read(tmp_path):
  missing = str(tmp_path / 'no_such_data')
  with pytest.raises(UserError, match="input.auto_augment='trivial_augment_wide' runs in the "
                     'streaming'):
    experiment.build(tiny_config(missing, **{'input.auto_augment': 'trivial_augment_wide'}))
  with pytest.raises(UserError, match='streaming input needs input.image_size'):
    experiment.build(tiny_config(missing, **{'dataset.pipeline': 'streaming',
                                             'input.image_size': 0, 'input.crop_padding': 0}))


def test_checks_of_the_run_take_its_facts_as_arguments():
  config = tiny_config('unused')
  with pytest.raises(UserError, match='mesh.model=2 does not divide the 1 devices of each'):
    config.mesh.model = 2
    config_checks.check_mesh(config, 4, local_devices=1, process_count=4)
  config.mesh.model, config.input.image_size, config.input.normalization = 1, 32, 'imagenet'
  with pytest.raises(UserError, match='train.batch_size=16 must be a multiple of the 3 '
                     'processes'):
    config_checks.check_pipeline(config, 'streaming', process_count=3)
  with pytest.raises(UserError, match='train.batch_size=16 exceeds the 10 training examples'):
    config_checks.check_data(config, num_train=10)
  config.input.image_size = 28
  with pytest.raises(UserError, match='input.image_size=28 is smaller than the 32x32 images'):
    config_checks.check_data(config, image_shape=(32, 32, 3))
  config_checks.check_data(config, num_train=16, image_shape=(28, 28, 1))


UNMEASURED_RECIPES = {('resnet', 'imagenet_resnet50_tv2'), ('resnet', 'imagenet_resnet50_mlperf')}


def test_only_the_unmeasured_recipes_use_the_unmeasured_fields():
  """What no run has measured is marked: the two ImageNet recipes, and the fields only they
  use, which a run names when it starts."""
  from test_zoo import config_args, load_config  # pylint: disable=g-import-not-at-top
  for module, arg in config_args() + [('speedrun', None), ('speedrun', 'quick')]:
    fields = config_checks.unmeasured(load_config(module, arg))
    assert bool(fields) == ((module, arg) in UNMEASURED_RECIPES), (module, arg, fields)
    if fields:
      doc = getattr(__import__(f'configs.{module}', fromlist=['x']),
                    {'imagenet_resnet50_tv2': 'imagenet_tv2',
                     'imagenet_resnet50_mlperf': 'imagenet_mlperf'}[arg]).__doc__
      assert doc.startswith('NOT YET MEASURED'), arg
  with open(os.path.join(ROOT, 'docs', 'recipes.md')) as f:
    recipes = f.read()
  for _, arg in UNMEASURED_RECIPES:
    assert f'`configs/resnet.py:{arg}` (**not yet measured**)' in recipes


def test_a_run_of_an_unmeasured_recipe_says_so_when_it_starts(idx_dir, tmp_path, monkeypatch,
                                                               caplog):
  from cvjax import train  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(train, 'train_loop', lambda *a: 'not trained')  # The start alone.
  caplog.set_level('WARNING', logger='absl')
  assert train.train_and_evaluate(tiny_config(idx_dir), str(tmp_path / 'a')) == 'not trained'
  assert 'Not yet measured' not in caplog.text
  config = tiny_config(idx_dir, **{'input.mixup_alpha': 0.2, 'optimizer.name': 'lars'})
  train.train_and_evaluate(config, str(tmp_path / 'b'))
  line, = [l for l in caplog.text.splitlines() if 'Not yet measured' in l]
  assert 'optimizer.name=lars, input.mixup_alpha' in line
