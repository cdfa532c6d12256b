"""python -m cvjax.data.preresize: train/ resized, val/ copied byte for byte, resumable."""

import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from cvjax.data import preresize
from cvjax.data import streaming
from cvjax.errors import UserError


def write_folder(root, sizes=((120, 90), (90, 120), (40, 30))):
  """train/ and val/ with two classes; each class holds one JPEG per (width, height)."""
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for cls in ('n02', 'n01'):
      os.makedirs(os.path.join(root, split, cls))
      for i, (w, h) in enumerate(sizes):
        img = rng.integers(0, 255, (h, w, 3)).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(root, split, cls, f'{cls}_{i}.JPEG'), quality=95)
  return str(root)


def files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                for f in fs)


def read(path):
  with open(path, 'rb') as f:
    return f.read()


def test_train_resized_val_copied_layout_kept(tmp_path):
  src = write_folder(tmp_path / 'src')
  dst = str(tmp_path / 'dst')
  assert preresize.main([src, dst, '--short_side=60', '--workers=2']) == 0
  assert files(dst) == files(src)
  for cls in ('n01', 'n02'):
    sizes = [Image.open(os.path.join(dst, 'train', cls, f'{cls}_{i}.JPEG')).size
             for i in range(3)]
    assert sizes == [(80, 60), (60, 80), (40, 30)]  # Shorter side 60; a small one untouched.
    small = os.path.join('train', cls, f'{cls}_2.JPEG')
    assert read(os.path.join(dst, small)) == read(os.path.join(src, small))
    for i in range(3):
      val = os.path.join('val', cls, f'{cls}_{i}.JPEG')
      assert read(os.path.join(dst, val)) == read(os.path.join(src, val))
  splits = streaming.image_folder(dst)  # The streaming input reads it as any image folder.
  assert splits.class_names == ['n01', 'n02'] and len(splits.train) == 6


def test_rerun_skips_done_files_and_resumes(tmp_path):
  src = write_folder(tmp_path / 'src')
  dst = str(tmp_path / 'dst')
  assert preresize.preresize(src, dst, short_side=60, workers=1) == (12, 0)
  first = {f: read(os.path.join(dst, f)) for f in files(dst)}
  os.remove(os.path.join(dst, 'train', 'n01', 'n01_0.JPEG'))  # As if stopped before it.
  assert preresize.preresize(src, dst, short_side=60, workers=1) == (1, 11)
  assert {f: read(os.path.join(dst, f)) for f in files(dst)} == first


def test_reads_a_tar_gz(tmp_path):
  src = write_folder(tmp_path / 'src')
  archive = str(tmp_path / 'imagenet.tar.gz')
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(src, arcname='imagenet')
  dst = str(tmp_path / 'dst')
  assert preresize.preresize(archive, dst, short_side=60, workers=1) == (12, 0)
  assert Image.open(os.path.join(dst, 'imagenet', 'train', 'n01', 'n01_0.JPEG')).size == (80, 60)
  val = os.path.join('imagenet', 'val', 'n02', 'n02_0.JPEG')
  assert read(os.path.join(dst, val)) == read(os.path.join(src, 'val', 'n02', 'n02_0.JPEG'))


def no_train_tar(root):
  archive = str(root / 'val_only.tar')
  if not os.path.exists(archive):
    src = write_folder(root / 'val_only')
    with tarfile.open(archive, 'w') as tar:
      tar.add(os.path.join(src, 'val'), arcname='val')
  return archive


@pytest.mark.parametrize('make, message', [
    (lambda p: str(p / 'missing'), 'does not exist'),
    (lambda p: (p / 'x.tar').write_text('not a tar') and str(p / 'x.tar'), 'not a tar archive'),
    (lambda p: (p / 'empty').mkdir(exist_ok=True) or str(p / 'empty'), 'holds no train/<class>/'),
    (lambda p: no_train_tar(p), 'holds no train/<class>/'),
])
def test_bad_source_is_a_user_error(tmp_path, make, message, capsys):
  with pytest.raises(UserError, match=message):
    preresize.preresize(make(tmp_path), str(tmp_path / 'dst'), workers=1)
  assert preresize.main([make(tmp_path), str(tmp_path / 'dst2')]) == 2
  assert message in capsys.readouterr().err


def test_a_damaged_train_image_is_named(tmp_path):
  src = write_folder(tmp_path / 'src')
  bad = os.path.join(src, 'train', 'n01', 'n01_0.JPEG')
  with open(bad, 'wb') as f:
    f.write(b'\xff\xd8garbage' * 10)
  with pytest.raises(UserError, match='n01_0.JPEG'):
    preresize.preresize(src, str(tmp_path / 'dst'), short_side=60, workers=1)
