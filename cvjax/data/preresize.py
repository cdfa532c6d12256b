"""Writes a pre-resized copy of an ImageNet-layout image folder, once, for faster training input:

  python -m cvjax.data.preresize imagenet/ imagenet_256/ --short_side=256
  python -m cvjax.main --config=configs/resnet.py:imagenet_resnet50 --workdir=runs/r50 \
      --config.dataset.path=imagenet_256

SRC is an image folder (train/<class>/*.JPEG, val/<class>/*.JPEG, optionally under one top
folder) or a .tar/.tar.gz/.tgz of one. DST gets the same layout. Each train image whose shorter
side is over --short_side is resized (Lanczos, antialiased) to that shorter side and written as
a JPEG of --quality; smaller train images and every other split (val/, test/) are copied byte
for byte, so evaluation reads exactly the files it read before. Decoding and resizing a full
~500x375 ImageNet JPEG is most of the training input's host time; a 256-pixel shorter side
keeps every random-resized crop's full-area draw at or above 224 pixels a side (a cap on the
longer side would not: 500x375 capped at 256 is 256x192), the resolution FFCV-style pipelines
train from. Files go through all the host's cores; a file already in DST is skipped, so a
stopped run resumes by running the same command again. Files that are not images are not
copied.
"""

import argparse
import io
import multiprocessing
import os
import sys
import tarfile

from cvjax.data import image_files
from cvjax.errors import UserError

RESIZED_SPLITS = ('train',)


def _resized_split(rel):
  """Whether the file at `rel` (a path inside SRC) is in a split that gets resized: one of
  its first two folders (the split, under an optional top folder) is train/."""
  parts = rel.replace(os.sep, '/').split('/')[:-1]
  return any(p in RESIZED_SPLITS for p in parts[:2])


def convert(data, rel, short_side, quality):
  """The bytes to write for the image `data` found at `rel`: `data` itself outside train/
  or when its shorter side is short_side or less; otherwise the image resized so its shorter
  side is short_side, re-encoded (JPEG at `quality` for .jpg/.jpeg)."""
  if not _resized_split(rel):
    return data
  from PIL import Image  # pylint: disable=g-import-not-at-top
  w, h = image_files.size(data, rel)
  if min(w, h) <= short_side:
    return data
  img = image_files.decode(data, rel, grey=True)
  scale = short_side / min(w, h)
  size = (max(short_side, round(w * scale)), max(short_side, round(h * scale)))
  img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
  out = io.BytesIO()
  ext = os.path.splitext(rel)[1].lower()
  if ext in ('.jpg', '.jpeg'):
    img.save(out, format='JPEG', quality=quality)
  else:
    img.save(out, format=Image.registered_extensions().get(ext, 'PNG'))
  return out.getvalue()


def _write(dst, rel, data):
  """Writes atomically: a stopped run leaves no half file under the final name."""
  path = os.path.join(dst, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.partial'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def _job(args):
  dst, rel, src_path, data, short_side, quality = args
  if data is None:
    with open(src_path, 'rb') as f:
      data = f.read()
  _write(dst, rel, convert(data, rel, short_side, quality))
  return rel


def _folder_jobs(src):
  for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
    dirnames.sort()
    for name in sorted(filenames):
      if image_files.is_image(name):
        path = os.path.join(dirpath, name)
        yield os.path.relpath(path, src), path


def _check_source(src):
  if not os.path.exists(src):
    raise UserError(f'{src} does not exist; expected an image folder (train/<class>/*.JPEG, '
                    'val/<class>/*.JPEG) or a .tar/.tar.gz of one.')
  if os.path.isfile(src):
    if not tarfile.is_tarfile(src):
      raise UserError(f'{src} is a file but not a tar archive; expected an image folder or a '
                      '.tar/.tar.gz of one (train/<class>/*.JPEG, val/<class>/*.JPEG).')
    return
  if not image_files.list_image_folder(src).get('train'):
    raise UserError(f'{src} holds no train/<class>/ folder of images (optionally under one top '
                    'folder); expected the ILSVRC layout: train/<class>/*.JPEG, '
                    'val/<class>/*.JPEG.')


def preresize(src, dst, short_side=256, quality=90, workers=None):
  """Writes DST from SRC (see the module docstring); returns (written, skipped) counts."""
  if short_side < 1:
    raise UserError(f'--short_side={short_side}: expected a positive number of pixels.')
  if not 1 <= quality <= 95:
    raise UserError(f'--quality={quality}: expected 1-95 (PIL\'s JPEG quality scale).')
  _check_source(src)
  if os.path.abspath(dst) == os.path.abspath(src):
    raise UserError(f'DST {dst} is SRC: write the pre-resized copy to a new folder.')
  workers = workers or len(os.sched_getaffinity(0))
  done = lambda rel: os.path.exists(os.path.join(dst, rel))
  skipped = 0

  def jobs():
    nonlocal skipped
    if os.path.isfile(src):
      try:
        with tarfile.open(src) as tar:
          for member in tar:
            rel = os.path.normpath(member.name)
            if not member.isfile() or not image_files.is_image(rel):
              continue
            if rel.startswith('..') or os.path.isabs(rel):
              raise UserError(f'{src}: member {member.name} points outside the archive.')
            if done(rel):
              skipped += 1
              continue
            yield dst, rel, None, tar.extractfile(member).read(), short_side, quality
      except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f'cannot read {src} as a tar archive: {e}. Files written so far stay; '
                        'the same command resumes.') from None
    else:
      for rel, path in _folder_jobs(src):
        if done(rel):
          skipped += 1
          continue
        yield dst, rel, path, None, short_side, quality

  written = 0
  if workers <= 1:
    for job in jobs():
      _job(job)
      written += 1
  else:
    with multiprocessing.get_context('spawn').Pool(workers) as pool:
      for _ in pool.imap_unordered(_job, jobs(), chunksize=16):
        written += 1
  if os.path.isfile(src) and not image_files.list_image_folder(dst).get('train'):
    raise UserError(f'{src} holds no train/<class>/ folder of images (optionally under one top '
                    'folder); expected the ILSVRC layout: train/<class>/*.JPEG, '
                    'val/<class>/*.JPEG.')
  return written, skipped


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m cvjax.data.preresize', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('src', help='image folder, or .tar/.tar.gz of one')
  parser.add_argument('dst', help='folder to write (created; files already there are kept)')
  parser.add_argument('--short_side', type=int, default=256,
                      help='train images are resized so their shorter side is at most this')
  parser.add_argument('--quality', type=int, default=90, help='JPEG quality of resized images')
  parser.add_argument('--workers', type=int, default=0,
                      help='processes (0: one per core this process may use)')
  args = parser.parse_args(argv)
  try:
    written, skipped = preresize(args.src, args.dst, args.short_side, args.quality,
                                 args.workers)
  except UserError as e:
    print(f'cvjax.data.preresize: error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {written:,} images to {args.dst} ({skipped:,} already there); train/ resized to '
        f'a shorter side of at most {args.short_side}, other splits copied as they are; use '
        f'--config.dataset.path={args.dst}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
