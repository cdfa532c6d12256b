"""The streaming pipeline: augmentation geometry, sharding, exact-once eval, resume, tfds."""

import functools
import importlib.util
import io
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from conftest import tiny_config
from cvjax import data as data_lib
from cvjax import models, steps, train
from cvjax.data import memory
from cvjax.data import streaming
from cvjax.data.input import imagenet_stats
from cvjax.errors import UserError
from test_train import assert_trees_close, read_jsonl


def write_jpeg_folder(root, train_per_class=6, val_per_class=3, classes=('n02', 'n01', 'n03'),
                      seed=0):
  """An ILSVRC-layout folder of JPEGs of mixed sizes; class k's images are bright in
  channel k."""
  rng = np.random.default_rng(seed)
  for split, n in (('train', train_per_class), ('val', val_per_class)):
    for k, wnid in enumerate(sorted(classes)):
      os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
      for i in range(n):
        h, w = rng.integers(36, 56, 2)
        img = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
        img[..., k] += 150
        Image.fromarray(img).save(os.path.join(root, split, wnid, f'{wnid}_{i}.JPEG'))
  return str(root)


def png_record(array, label=0):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, 'PNG')  # Lossless: pixel values survive.
  return {'image': buf.getvalue(), 'label': label}


def column_gradient(w, h, step=1):
  """Pixel value = column // step, so a pixel's value says which column it came from."""
  row = (np.arange(w) // step).astype(np.uint8)
  return np.repeat(np.broadcast_to(row[None, :, None], (h, w, 1)), 3, axis=2)


def test_random_resized_crop_box_statistics_and_determinism():
  boxes = [streaming.random_resized_crop_box(np.random.default_rng(i), 400, 300)
           for i in range(2000)]
  again = [streaming.random_resized_crop_box(np.random.default_rng(i), 400, 300)
           for i in range(2000)]
  assert boxes == again
  left, top, w, h = np.array(boxes).T
  assert (left >= 0).all() and (top >= 0).all()
  assert (left + w <= 400).all() and (top + h <= 300).all()
  area = w * h / (400 * 300)
  aspect = w / h
  assert area.min() >= 0.075 and area.max() <= 1.0
  assert aspect.min() >= 0.74 and aspect.max() <= 1.35
  assert area.min() < 0.1 and area.max() > 0.9  # Both ends of 8%-100% are reached.
  assert aspect.min() < 0.78 and aspect.max() > 1.28  # And of 3/4-4/3.
  assert len(set(left)) > 100 and len(set(top)) > 100  # Positions vary.


def test_train_transform_flips_half_the_images():
  record = png_record(column_gradient(200, 150))
  outs = [streaming.train_transform(record, np.random.default_rng(i), size=32,
                                    area=(0.5, 1.0), aspect=(3 / 4, 4 / 3), flip=True)
          for i in range(200)]
  assert all(o['images'].shape == (32, 32, 3) and o['images'].dtype == np.uint8 for o in outs)
  rising = [int(o['images'][16, -1, 0]) > int(o['images'][16, 0, 0]) for o in outs]
  assert 0.4 < np.mean(rising) < 0.6
  same = streaming.train_transform(record, np.random.default_rng(7), size=32, area=(0.5, 1.0),
                                   aspect=(3 / 4, 4 / 3), flip=True)
  np.testing.assert_array_equal(same['images'], outs[7]['images'])
  unflipped = [streaming.train_transform(record, np.random.default_rng(i), size=32,
                                         area=(0.5, 1.0), aspect=(3 / 4, 4 / 3), flip=False)
               for i in range(20)]
  assert all(o['images'][16, -1, 0] > o['images'][16, 0, 0] for o in unflipped)


@pytest.mark.parametrize('w,h,step,first,last', [
    (256, 256, 1, 16, 239),  # Already 256: the centre 224 spans columns 16..239.
    (512, 256, 2, 72, 183),  # Shorter side 256: columns 144..367 of 512, values // 2.
    (1024, 512, 4, 72, 183),  # Halved to 512x256 first: the same field of view.
    (256, 512, 1, 16, 239),  # Portrait: the shorter side is the width.
])
def test_eval_transform_resizes_the_shorter_side_and_crops_the_centre(w, h, step, first, last):
  out = streaming.eval_transform(png_record(column_gradient(w, h, step)), size=224, crop=224)
  assert out['images'].shape == (224, 224, 3) and out['mask']
  row = out['images'][100, :, 0].astype(int)
  assert abs(row[0] - first) <= 1 and abs(row[-1] - last) <= 1
  assert streaming.resize_size(224) == 256
  ten = streaming.eval_transform(png_record(column_gradient(w, h, step)), size=224, crop=256)
  assert ten['images'].shape == (256, 256, 3)


def identity_transform(record):
  return {'images': np.full((2, 2, 3), record, np.uint8), 'labels': np.int32(record),
          'mask': np.bool_(True)}


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_counts_every_example_once_across_processes(process_count):
  source = list(range(11))
  per_process = [list(streaming.eval_dataset(
      source, batch_size=4, transform=identity_transform, pad_shape=(2, 2, 3),
      process_index=p, process_count=process_count)) for p in range(process_count)]
  assert len({len(b) for b in per_process}) == 1 and len(per_process[0]) == 3  # ceil(11/4).
  labels, masks = [], []
  for batches in zip(*per_process):  # The global batch: the processes' parts in order.
    labels += [b['labels'] for b in batches]
    masks += [b['mask'] for b in batches]
  labels, masks = np.concatenate(labels), np.concatenate(masks)
  assert labels[masks].tolist() == list(range(11))
  assert masks.sum() == 11 and not masks[11:].any()


def label_transform(record, rng):
  return {'images': np.zeros((1,), np.uint8), 'labels': np.int32(record),
          'noise': np.float32(rng.random())}


def test_train_batches_shard_by_process_and_restart_at_any_step():
  source = list(range(12))
  kw = dict(seed=3, batch_size=4, transform=label_transform)
  whole = streaming.train_dataset(source, start_step=0, **kw)
  glob = [whole[k] for k in range(9)]  # 3 epochs of 3 batches.
  for epoch in range(3):  # Each epoch sees every example once, in a new order.
    labels = np.concatenate([b['labels'] for b in glob[3 * epoch:3 * epoch + 3]])
    assert sorted(labels) == list(range(12))
  assert not np.array_equal(glob[0]['labels'], glob[3]['labels'])
  parts = [streaming.train_dataset(source, start_step=2, process_index=p, process_count=2, **kw)
           for p in range(2)]
  for k in range(5):  # Two processes' halves make the global batch, from step 2 on.
    for key in ('labels', 'noise'):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][k][key], parts[1][k][key]]), glob[k + 2][key])
  assert len(parts[0][0]['labels']) == 2


@pytest.mark.slow
def test_workers_do_not_change_the_batches(tmp_path):
  splits = streaming.image_folder(write_jpeg_folder(tmp_path))
  ds = streaming.train_dataset(
      splits.train, seed=0, batch_size=6, start_step=1, transform=functools.partial(
          streaming.train_transform, size=16, area=(0.08, 1.0), aspect=(3 / 4, 4 / 3),
          flip=True))
  runs = []
  for workers in (0, 1):
    it = streaming._iterate(ds, workers, threads=2)
    runs.append([next(it) for _ in range(3)])
    it.close()
  for a, b in zip(*runs):
    np.testing.assert_array_equal(a['images'], b['images'])
    np.testing.assert_array_equal(a['labels'], b['labels'])


def test_image_folder_layout_and_errors(tmp_path):
  splits = streaming.image_folder(write_jpeg_folder(tmp_path / 'top' / 'ilsvrc'))
  assert splits.class_names == ['n01', 'n02', 'n03']
  assert len(splits.train) == 18 and len(splits.test) == 9
  assert sorted(np.bincount(splits.test.labels)) == [3, 3, 3]
  record = splits.train[0]
  assert record['label'] == 0 and record['where'].endswith('n01_0.JPEG')
  shutil.rmtree(tmp_path / 'top' / 'ilsvrc' / 'val')
  with pytest.raises(UserError, match='val/<class>'):
    streaming.image_folder(str(tmp_path / 'top'))
  with pytest.raises(UserError, match='cannot decode image .*bad.JPEG'):
    streaming.decode({'image': b'not a jpeg', 'where': 'x/bad.JPEG'})


def test_tfds_imagenet_offline(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  (tmp_path / 'downloads' / 'manual').mkdir(parents=True)
  (tmp_path / 'downloads' / 'manual' / 'ILSVRC2012_img_val.tar').write_bytes(b'')
  with pytest.raises(UserError, match=r'(?s)ILSVRC2012_img_train.tar.*ILSVRC2012_img_val.tar.*'
                     + str(tmp_path / 'downloads' / 'manual') + r'/ \(missing: '
                     r'ILSVRC2012_img_train.tar\)'):
    streaming.tfds_imagenet('imagenet2012', str(tmp_path))
  # Mock data stands in for the prepared ArrayRecord files.
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  with tfds.testing.mock_data(num_examples=4):
    splits = streaming.tfds_imagenet('imagenet2012', str(tmp_path))
    assert len(splits.class_names) == 1000 and splits.class_names[0] == 'n01440764'
    assert len(splits.train) == 4 and isinstance(splits.train[0]['image'], bytes)
    out = streaming.train_transform(splits.train[1], np.random.default_rng(0), size=24,
                                    area=(0.08, 1.0), aspect=(3 / 4, 4 / 3), flip=True)
    assert out['images'].shape == (24, 24, 3)


def test_pipeline_selection(tmp_path, idx_dir):
  cfg = lambda **kw: ConfigDict({'name': 'cifar10', 'path': '', 'pipeline': 'auto', **kw})
  pick = data_lib.pipeline_for
  assert pick(cfg()) == 'memory'
  assert pick(cfg(name='imagenet2012')) == 'streaming'
  assert pick(cfg(name='imagenet2012', pipeline='memory')) == 'memory'
  assert pick(cfg(path=idx_dir)) == 'memory'
  assert pick(cfg(path=write_jpeg_folder(tmp_path / 'ilsvrc'))) == 'streaming'  # val/
  same = tmp_path / 'cifar'  # Same-size images under train/ and test/: small, in memory.
  for split in ('train', 'test'):
    (same / split / 'a').mkdir(parents=True)
    for i in range(3):
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(same / split / 'a' / f'{i}.jpg')
  assert pick(cfg(path=str(same))) == 'memory'
  assert pick(cfg(path=str(same), pipeline='streaming')) == 'streaming'
  Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(same / 'test' / 'a' / '1.jpg')
  assert pick(cfg(path=str(same))) == 'streaming'  # Mixed sizes.
  with pytest.raises(UserError, match='auto, memory or streaming'):
    pick(cfg(pipeline='disk'))


def streaming_config(data, **overrides):
  return tiny_config(data, **{
      'dataset.pipeline': 'streaming', 'input.image_size': 32, 'input.normalization': 'imagenet',
      'input.crop_padding': 0, 'train.batch_size': 8, 'train.eval_batch_size': 4,
      'input.threads': 2, **overrides})


@pytest.mark.slow
def test_streaming_resume_matches_an_uninterrupted_run(tmp_path):
  data = write_jpeg_folder(tmp_path / 'data', train_per_class=8)  # 24 images: 3 steps/epoch.
  config = streaming_config(data)  # 12 steps (4 epochs), checkpoints every 4.
  full, test = train.train_and_evaluate(config, str(tmp_path / 'full'))
  assert test['test/count'] == 9  # 9 val images in batches of 4: 3 of 12 slots padding.
  shutil.copytree(tmp_path / 'full', tmp_path / 'resumed')
  for step in ('8', '12'):
    shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / step)
  resumed, _ = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert int(resumed.step) == 12
  assert_trees_close(full.params, resumed.params, rtol=1e-6, atol=1e-7)
  assert_trees_close(full.model_state, resumed.model_state, rtol=1e-6, atol=1e-7)
  steps = [r['step'] for r in read_jsonl(tmp_path / 'resumed') if 'train/loss' in r]
  assert steps == [4, 8, 12]


@pytest.mark.slow
@pytest.mark.parametrize('streamed', [False, True])
def test_ten_crop_equals_averaging_the_ten_views_by_hand(streamed):
  model = models.create_model(ConfigDict(dict(
      name='resnet_cifar', depth=8, residual=True, activation='relu', batch_norm=True,
      bn_momentum=0.9, zero_init_residual=False, scan_blocks=False)), num_classes=5,
      dtype=jnp.float32)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
  state = steps.TrainState(step=0, params=variables['params'],
                           model_state={'batch_stats': variables['batch_stats']}, opt_state=None)
  rng = np.random.default_rng(0)
  # Streamed: 20x20 images, 16x16 crops; in memory: 16x16 images padded by 2.
  side, pad = (20, 0) if streamed else (16, 2)
  images = rng.integers(0, 256, (4, side, side, 3)).astype(np.uint8)
  labels = np.array([0, 1, 2, 3], np.int32)
  mean, std = imagenet_stats()
  test = {'mean': mean, 'std': std}
  if streamed:
    batch = {'images': images, 'labels': labels, 'mask': np.ones(4, bool)}
  else:
    test.update(images=images, labels=labels, mask=np.ones(4, bool))
    batch = {'index': 0}
  make_eval_batch = (streaming.eval_batch if streamed else
                     functools.partial(memory.eval_batch, batch_size=4))
  kw = dict(model=model, make_eval_batch=make_eval_batch, dtype=jnp.float32,
            batch_sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  metrics, (pred, confidence) = jax.jit(functools.partial(
      steps.eval_step, crops=10, crop_size=16, padding=pad, **kw))(state, test, batch)
  one, _ = jax.jit(functools.partial(steps.eval_step, **kw))(state, test, batch)
  x = (images / 255.0 - mean) / std
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  s = x.shape[1] - 16
  views = [x[:, y:y + 16, c:c + 16] for y, c in ((0, 0), (0, s), (s, 0), (s, s), (s // 2, s // 2))]
  views += [v[:, :, ::-1] for v in views]
  logits = np.mean([model.apply(variables, v.astype(np.float32), train=False) for v in views], 0)
  np.testing.assert_array_equal(pred[:, 0], np.argmax(logits, -1))  # Top-5 classes, best first.
  np.testing.assert_allclose(confidence, np.max(jax.nn.softmax(logits), -1), rtol=1e-5)
  loss = -np.sum(jax.nn.log_softmax(logits)[np.arange(4), labels])
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-4)
  assert not np.isclose(one['loss'], loss, rtol=1e-3)  # 10 crops differ from the centre crop.


def jpeg_bytes(array, mode=None, **save):
  buf = io.BytesIO()
  Image.fromarray(array).convert(mode or ('L' if array.ndim == 2 else 'RGB')).save(
      buf, 'JPEG', **save)
  return buf.getvalue()


def smooth_image(w, h, seed=0):
  """A photo-like image: smooth gradients and a few edges, not noise."""
  y, x = np.mgrid[0:h, 0:w] / max(w, h)
  rng = np.random.default_rng(seed)
  img = np.stack([np.sin(6 * x + 2 * y + rng.uniform(0, 6)) for _ in range(3)], -1) * 90 + 128
  img[h // 3:h // 2, w // 4:w // 2] = rng.integers(0, 255, 3)
  return img.astype(np.uint8)


def test_evaluation_decodes_the_bits_pil_decodes():
  # Evaluation decodes every image at full scale, through simplejpeg where installed: the same
  # pixels as PIL's decoder, so eval numbers match runs before the faster decoder. RGB, 4:4:4
  # and 4:2:0 chroma, greyscale, progressive JPEGs, and a PNG (which only PIL reads).
  from cvjax.data import image_files  # pylint: disable=g-import-not-at-top
  rgb = smooth_image(75, 50)
  for data in (jpeg_bytes(rgb), jpeg_bytes(rgb, subsampling=0, quality=95),
               jpeg_bytes(rgb[..., 0]), jpeg_bytes(rgb, progressive=True),
               png_record(rgb)['image']):
    img, scale = image_files.decode_scaled(data, 'x')
    assert scale == 1.0
    np.testing.assert_array_equal(np.asarray(img), np.asarray(image_files.decode(data, 'x')))
    record = {'image': data, 'label': 0}
    np.testing.assert_array_equal(  # The whole eval transform, against PIL's decode.
        streaming.eval_transform(record, size=32, crop=32)['images'],
        streaming.eval_transform(png_record(np.asarray(image_files.decode(data, 'x'))),
                                 size=32, crop=32)['images'])


@pytest.mark.parametrize('simplejpeg', [True, False])
def test_large_crops_decode_at_a_reduced_scale(monkeypatch, simplejpeg):
  # A crop of at least twice the output size is decoded at 1/2 (or less) by the JPEG's
  # scaled IDCT, with or without simplejpeg (PIL's draft mode), and looks like the full decode
  # (DCT scaling is a low-pass filter, as the antialiased resize is); smaller crops decode in
  # full, and then a training image is what it was before the scaled decoder.
  import sys  # pylint: disable=g-import-not-at-top
  from cvjax.data import image_files  # pylint: disable=g-import-not-at-top
  if not simplejpeg:
    monkeypatch.setitem(sys.modules, 'simplejpeg', None)  # import raises ImportError
  data = jpeg_bytes(smooth_image(400, 300), quality=95)
  for scale, factor in ((0.5, 0.5), (0.3, 0.5), (0.2, 0.25), (0.1, 0.125), (0.6, 1.0)):
    img, got = image_files.decode_scaled(data, 'x', scale)
    assert got == factor and img.size == (int(np.ceil(400 * factor)), int(np.ceil(300 * factor)))
  record = {'image': data, 'label': 0}
  kw = dict(size=32, area=(0.9, 1.0), aspect=(1.0, 1.0), flip=False)  # 300 x 300 crops: 1/8.
  fast = streaming.train_transform(record, np.random.default_rng(0), **kw)['images']
  monkeypatch.setattr(image_files, 'decode_scaled',
                      lambda data, where, scale=1.0, then='', array=False:
                      (image_files.decode(data, where), 1.0))
  full = streaming.train_transform(record, np.random.default_rng(0), **kw)['images']
  assert np.abs(fast.astype(float) - full).mean() < 3  # of 255
  # Crops below twice the size decode in full: the same bits as PIL's decode and resize.
  left, top, w, h = streaming.random_resized_crop_box(np.random.default_rng(0), 400, 300,
                                                      kw['area'], kw['aspect'])
  expected = Image.open(io.BytesIO(data)).convert('RGB').resize(
      (200, 200), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
  np.testing.assert_array_equal(
      streaming.train_transform(record, np.random.default_rng(0), **dict(kw, size=200))['images'],
      np.asarray(expected))


@pytest.mark.parametrize('area,png', [((0.9, 1.0), False), ((0.005, 0.01), False),
                                      ((0.9, 1.0), True)])  # Shrink, enlarge, shrink 4x+.
def test_opencv_train_resize_matches_pillows(area, png):
  # input.train_resize=opencv: the same crop, flip and label as Pillow's path from the same
  # draws, the pixels within a filter's difference (bilinear; OpenCV's area filter for a PNG,
  # which is not decoded at a reduced scale); a box, axis or channel order out of place would
  # differ by tens of levels on this image.
  pytest.importorskip('cv2')
  image = smooth_image(400, 300)
  record = {'image': png_record(image)['image'] if png else jpeg_bytes(image, quality=95),
            'label': 3}
  for seed in range(8):
    kw = dict(size=48, area=area, aspect=(3 / 4, 4 / 3), flip=True)
    out = {r: streaming.train_transform(record, np.random.default_rng(seed), **kw, resize=r)
           for r in ('pil', 'opencv')}
    a, b = out['pil']['images'], out['opencv']['images']
    assert b.shape == a.shape == (48, 48, 3) and b.dtype == np.uint8 and b.flags.c_contiguous
    assert out['opencv']['labels'] == 3
    assert np.abs(a.astype(float) - b).mean() < 4, seed  # of 255
    assert np.abs(a.astype(float) - b[:, ::-1]).mean() > 8  # The flip is the same flip.
  augmented = streaming.train_transform(record, np.random.default_rng(0), **kw,
                                        auto_augment='trivial_augment_wide', resize='opencv')
  assert augmented['images'].shape == (48, 48, 3)


def test_opencv_train_resize_is_checked_before_the_run(monkeypatch):
  from configs import common  # pylint: disable=g-import-not-at-top
  from cvjax import config_checks  # pylint: disable=g-import-not-at-top
  from cvjax.errors import UserError  # pylint: disable=g-import-not-at-top
  config = common.base_config()
  config.input.train_resize = 'cv2'
  with pytest.raises(UserError, match=r"train_resize='cv2'; expected pil .* or opencv"):
    config_checks.check_config(config, 1)
  config.input.train_resize = 'opencv'
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)
  with pytest.raises(UserError, match='opencv-python-headless'):
    config_checks.check_config(config, 1)


def test_workers_from_the_cores_this_process_may_use(monkeypatch):
  # -1 workers: every core but one, not capped (a 64-core host feeds with 63 workers).
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(64)), raising=False)
  assert streaming.host_cores() == 64
