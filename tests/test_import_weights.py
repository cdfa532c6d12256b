"""torchvision weights into cvjax: logits parity on random weights, and clear errors."""

import os

import numpy as np
import pytest

from cvjax import experiment, import_weights  # pylint: disable=g-import-not-at-top
from cvjax.tools import weights_parity  # pylint: disable=g-import-not-at-top
from cvjax.errors import UserError  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow  # torchvision nets at 224x224.
torch = None  # The module, once the fixture below imported it.


@pytest.fixture(autouse=True, scope='module')
def torch_installed():
  """PyTorch, imported when these tests run; conftest imports torchvision before the first
  test of a session that runs them (imported after TensorFlow it crashes the process)."""
  global torch  # pylint: disable=global-statement
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')

# float32 on both sides, different summation orders: the logits agree to ~1e-6 of their
# largest magnitude (measured: docs/weights.md). A wrong mapping is off by O(1).
TOLERANCE = 1e-4  # Of the largest |logit|.


def assert_parity(row):
  assert row['max_abs_logit'] > 0.1, row  # Non-trivial logits.
  assert row['max_abs_diff'] <= TOLERANCE * row['max_abs_logit'], row
  assert row['argmax_agree'] == row['batch'], row


@pytest.mark.parametrize('model,batch', [('resnet18', 2), ('resnet50', 2), ('vgg11_bn', 1),
                                         ('alexnet', 2)])
def test_random_torchvision_weights_give_the_same_logits(model, batch, tmp_path):
  assert_parity(weights_parity.compare(model, batch=batch, folder=str(tmp_path)))


def test_a_wrong_mapping_is_caught(monkeypatch, tmp_path):
  """Without the (C, H, W) -> (H, W, C) reordering of fc6's inputs, or with conv kernels
  transposed in space (same shapes, so only the numbers can tell), parity fails."""
  convert = import_weights.to_cvjax_layout

  def no_fc6_permutation(value, path, cfg):
    return value.T if path[0] == 'fc6' and path[-1] == 'kernel' else convert(value, path, cfg)

  def kernels_transposed(value, path, cfg):
    out = convert(value, path, cfg)
    return out.transpose(1, 0, 2, 3) if out.ndim == 4 else out

  for model, wrong in (('alexnet', no_fc6_permutation), ('resnet18', kernels_transposed)):
    monkeypatch.setattr(import_weights, 'to_cvjax_layout', wrong)
    row = weights_parity.compare(model, folder=str(tmp_path))
    assert row['max_abs_diff'] > 100 * TOLERANCE * row['max_abs_logit'], row


@pytest.fixture(scope='module')
def resnet18_pth(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('weights') / 'resnet18.pth')
  torch.save(weights_parity.random_torchvision('resnet18').state_dict(), path)
  return path


def edited(path, tmp_path, edit):
  state = torch.load(path, weights_only=True)
  edit(state)
  out = str(tmp_path / 'edited.pth')
  torch.save(state, out)
  return out


@pytest.mark.parametrize('edit,message', [
    (lambda s: s.update(extra=torch.zeros(3)), r'extra \(3,\) in the file matches no cvjax'),
    (lambda s: s.pop('layer3.1.bn2.running_var'),
     'batch_stats/conv4_2/bn2/var needs layer3.1.bn2.running_var'),
    (lambda s: s.update({'layer1.0.conv1.weight': torch.zeros(64, 64, 5, 5)}),
     r'layer1.0.conv1.weight has shape \(64, 64, 5, 5\)'),
])
def test_a_mismatched_file_is_refused_with_the_names(resnet18_pth, tmp_path, edit, message):
  with pytest.raises(UserError, match=message):
    import_weights.import_weights('resnet18', edited(resnet18_pth, tmp_path, edit),
                                  str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')  # Nothing written.


def test_other_models_and_bad_files_are_refused(resnet18_pth, tmp_path):
  with pytest.raises(UserError, match='needs layer1.2.bn1.bias, which the file does not'):
    # ResNet-18's file for a ResNet-34.
    import_weights.import_weights('resnet34', resnet18_pth, str(tmp_path / 'a'))
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(b'not a checkpoint')
  with pytest.raises(UserError, match='could not be read'):
    import_weights.import_weights('resnet18', str(bad), str(tmp_path / 'b'))
  torch.save({'model': {'fc.weight': torch.zeros(2, 2)}}, str(bad))
  with pytest.raises(UserError, match='not a state dict of tensors'):
    import_weights.import_weights('resnet18', str(bad), str(tmp_path / 'c'))
  config = import_weights.default_config('resnet50')
  config.model.stride_in_bottleneck = '1x1'
  with pytest.raises(UserError, match=r"stride_in_bottleneck='1x1' \(needs '3x3'\)"):
    import_weights.import_weights('resnet50', resnet18_pth, str(tmp_path / 'd'), config)


def test_vgg_and_alexnet_names_cover_the_torchvision_state_dicts():
  """Every torchvision name the mapping produces exists, without building the big nets."""
  import torchvision  # pylint: disable=g-import-not-at-top
  for model in ('vgg13', 'vgg16_bn', 'vgg19_bn', 'alexnet'):
    cfg = import_weights.default_config(model).model
    with torch.device('meta'):  # Names and shapes only, nothing allocated.
      names = set(getattr(torchvision.models, model)(weights=None).state_dict())
    table = (import_weights.ALEXNET if model == 'alexnet'
             else import_weights._vgg_name(cfg.depth, cfg.batch_norm))  # pylint: disable=protected-access
    produced = {f'{t}.{p}' for t in table.values() for p in ('weight', 'bias')}
    if cfg.get('batch_norm'):
      produced |= {f'{t}.{p}' for k, t in table.items() if k.startswith('BatchNorm')
                   for p in ('running_mean', 'running_var', 'num_batches_tracked')}
    assert produced == names, produced ^ names


def image_folder(root, size=64, classes=3, per_class=(4, 2)):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, n in zip(('train', 'test'), per_class):
    for c in range(classes):
      os.makedirs(root / split / f'class{c}')
      for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), np.uint8)
        Image.fromarray(pixels).save(root / split / f'class{c}' / f'{i}.png')
  return str(root)


def test_an_import_with_new_classes_evaluates_and_fine_tunes(resnet18_pth, tmp_path):
  """ImageNet weights onto a 3-class dataset: the new last layer starts at zero (all logits
  equal, so every image is predicted as class 0), then cvjax's training loop fine-tunes
  the imported checkpoint."""
  from cvjax import evaluate, train  # pylint: disable=g-import-not-at-top
  config = import_weights.default_config('resnet18')
  config.dataset.path = image_folder(tmp_path / 'data')
  config.input.image_size = 64
  config.train.batch_size = 4
  config.train.eval_batch_size = 6
  config.train.num_steps = 2
  workdir = str(tmp_path / 'run')
  identity, _ = import_weights.import_weights('resnet18', resnet18_pth, workdir, config,
                                              num_classes=3)
  assert identity['num_classes'] == 3 and identity['input_shape'] == [64, 64, 3]

  metrics, analysis = evaluate.evaluate_checkpoint(config, workdir)
  assert analysis['step'] == 0 and analysis['num_test'] == 6
  assert metrics['test/error'] == pytest.approx(4 / 6)  # Classes 1 and 2 are wrong.

  imported = evaluate.restore(experiment.build(config), workdir)
  state, _ = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 2
  assert not np.allclose(state.params['fc']['kernel'], 0)
  before = np.asarray(imported.params['conv1']['kernel']).ravel()
  after = np.asarray(state.params['conv1']['kernel']).ravel()
  # Training started from the imported stem (a fresh initialisation would be uncorrelated).
  assert not np.array_equal(before, after) and np.corrcoef(before, after)[0, 1] > 0.9


def test_non_finite_weights_and_bad_flags_are_refused(resnet18_pth, tmp_path):
  def poison(state):
    state['layer2.0.conv1.weight'][0, 0, 0, 0] = float('nan')
    state['fc.bias'][3] = float('inf')
  with pytest.raises(UserError, match=r'nan or inf values in 2 tensor\(s\): layer2.0.conv1.weight '
                     r'\(1 of 73728 values\), fc.bias \(1 of 1000 values\)'):
    import_weights.import_weights('resnet18', edited(resnet18_pth, tmp_path, poison),
                                  str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')
  with pytest.raises(UserError, match=r'--num_classes=-3; expected at least 1'):
    import_weights.import_weights('resnet18', resnet18_pth, str(tmp_path / 'run'),
                                  num_classes=-3)
  (tmp_path / 'file').write_text('')
  with pytest.raises(UserError, match=r'file exists and is not a directory'):
    import_weights.import_weights('resnet18', resnet18_pth, str(tmp_path / 'file'))
  assert not os.path.exists(tmp_path / 'run')
