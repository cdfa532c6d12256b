"""Turns the standard CIFAR-10 download into the image folder cvjax reads:

  python -m cvjax.data.convert_cifar10 cifar-10-python.tar.gz cifar10.tar.gz
  python -m cvjax.main --config=configs/resnet.py --workdir=runs/resnet20 \
      --config.dataset.path=cifar10.tar.gz

IN is the python version of the release (cifar-10-python.tar.gz from
https://www.cs.toronto.edu/~kriz/cifar.html: data_batch_1 ... data_batch_5, test_batch,
batches.meta, pickled). OUT is a .tar.gz of cifar10/{train,test}/<class>/NNNNN.png: lossless
PNG, so the pixels are the release's exactly; each class's images numbered in the release's
order. About a minute for the 60,000 images on one core. (tfds's copy needs no conversion:
leave dataset.path unset and dataset.name=cifar10 reads it.)
"""

import io
import os
import pickle
import sys
import tarfile

import numpy as np

from cvjax.errors import UserError

BATCHES = {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']}


def read_release(archive):
  """{split: (uint8 images [N, 32, 32, 3], int labels [N])} and the class names of the
  python-pickle release."""
  if not os.path.isfile(archive):
    raise UserError(f'{archive} is not a file; expected the CIFAR-10 python release, '
                    'cifar-10-python.tar.gz.')
  try:
    with tarfile.open(archive) as tar:
      members = {os.path.basename(m.name): m for m in tar if m.isfile()}
      missing = [n for n in ['batches.meta', *sum(BATCHES.values(), [])] if n not in members]
      if missing:
        raise UserError(f'{archive} lacks {", ".join(missing)}: expected the python version of '
                        'CIFAR-10 (cifar-10-python.tar.gz: data_batch_1..5, test_batch, '
                        'batches.meta), not the binary or MATLAB one.')
      load = lambda name: pickle.load(tar.extractfile(members[name]), encoding='bytes')
      names = [n.decode() for n in load('batches.meta')[b'label_names']]
      out = {}
      for split, batch_names in BATCHES.items():
        batches = [load(n) for n in batch_names]
        images = np.concatenate([np.asarray(b[b'data'], np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[b'labels'], np.int64) for b in batches])
        out[split] = (images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)
  except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError, KeyError) as e:
    raise UserError(f'cannot read {archive} as the CIFAR-10 python release: {e}') from None
  return out, names


def write_image_folder(splits, class_names, out_file, top='cifar10'):
  """OUT: a .tar.gz of top/{train,test}/<class>/NNNNN.png."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  tmp = f'{out_file}.partial'
  with tarfile.open(tmp, 'w:gz') as tar:
    for split, (images, labels) in splits.items():
      for cls in class_names:  # Every class's folder, so the labels follow the sorted names.
        info = tarfile.TarInfo(f'{top}/{split}/{cls}')
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
      counts = {}
      for image, label in zip(images, labels):
        cls = class_names[label]
        n = counts[cls] = counts.get(cls, -1) + 1
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format='PNG')
        info = tarfile.TarInfo(f'{top}/{split}/{cls}/{n:05d}.png')
        info.size = buf.tell()
        buf.seek(0)
        tar.addfile(info, buf)
  os.replace(tmp, out_file)  # A stopped conversion leaves no half archive under OUT's name.
  return {split: len(labels) for split, (_, labels) in splits.items()}


def main(argv):
  if len(argv) != 3 or not argv[2].endswith(('.tar.gz', '.tgz')):
    print(__doc__.strip(), file=sys.stderr)
    print('\nusage: python -m cvjax.data.convert_cifar10 IN.tar.gz OUT.tar.gz', file=sys.stderr)
    return 2
  try:
    splits, names = read_release(argv[1])
  except UserError as e:
    print(f'cvjax.data.convert_cifar10: error: {e}', file=sys.stderr)
    return 2
  counts = write_image_folder(splits, names, argv[2])
  print(f'wrote {argv[2]}: {counts["train"]:,} train and {counts["test"]:,} test images, '
        f'{len(names)} classes; use --config.dataset.path={argv[2]}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
