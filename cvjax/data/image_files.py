"""Image files, as both pipelines read them: which files are images, the listing of an image
folder and the decoders. numpy and PIL (and simplejpeg where installed), so grain's worker
processes import it cheaply.
"""

import io
import math
import os
import re

import numpy as np

from cvjax.errors import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.ppm')


def is_image(name):
  return name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_folder(root, splits=('train', 'val', 'test')):
  """{split: {class: [image paths relative to root, sorted]}} for the `splits` found under
  `root` or under one of its top-level folders (the first place a split is found wins),
  with one level of class folders, sorted. A class folder without images maps to []."""
  out = {}
  for top in (root, *[os.path.join(root, d) for d in sorted(os.listdir(root))
                      if os.path.isdir(os.path.join(root, d))]):
    for split in splits:
      split_dir = os.path.join(top, split)
      if split in out or not os.path.isdir(split_dir):
        continue
      classes = {}
      for cls in sorted(os.listdir(split_dir)):
        cls_dir = os.path.join(split_dir, cls)
        if os.path.isdir(cls_dir):  # From the listing alone: no stat per file.
          classes[cls] = sorted(os.path.relpath(e.path, root) for e in os.scandir(cls_dir)
                                if is_image(e.name) and e.is_file())
      if any(classes.values()):
        out[split] = classes
  return out


def decode(data, where, *, grey=False, then=''):
  """The PIL image in the encoded bytes `data` (from `where`), in RGB; `grey=True` keeps
  single-channel images as 'L'. A file PIL cannot read is a UserError that names it;
  `then` ends that message (what a re-run does, say)."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    img = Image.open(io.BytesIO(data))
    # Greyscale and CMYK JPEGs occur in ImageNet.
    return img.convert('L' if grey and img.mode in ('L', '1', 'I;16') else 'RGB')
  except UnidentifiedImageError:
    why = f'its {len(data)} bytes are not in an image format PIL reads (they begin {data[:8]!r})'
  except Exception as e:  # pylint: disable=broad-except
    why = f'{type(e).__name__}: ' + re.sub(r'<_io\.BytesIO object at 0x[0-9a-f]+>', 'the file',
                                           str(e))
  raise UserError(f'cannot decode image {where} ({len(data)} bytes): {why}. Replace or remove '
                  f'the file{"; " + then if then else "."}')


def size(data, where, *, then=''):
  """(width, height) of the image in `data`, from its header alone (a JPEG's through
  simplejpeg where installed: a fifth of PIL's time)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if data[:2] == b'\xff\xd8':
    try:
      import simplejpeg  # pylint: disable=g-import-not-at-top
      height, width, _, _ = simplejpeg.decode_jpeg_header(data)
      return width, height
    except Exception:  # pylint: disable=broad-except
      pass  # Not installed or damaged: PIL reads it or names it.
  try:
    return Image.open(io.BytesIO(data)).size
  except Exception:  # pylint: disable=broad-except
    decode(data, where, then=then)  # Raises the UserError that names the file.
    raise


def decode_scaled(data, where, scale=1.0, *, then='', array=False):
  """(RGB PIL image, its width over the full width) of the image in `data`, a JPEG decoded at
  the smallest DCT scale (1, 1/2, 1/4, 1/8) that keeps `scale` of each side: libjpeg-turbo's
  scaled IDCT never builds the full image. JPEGs go through simplejpeg where it is installed
  (twice PIL's decode speed on a Zen 4 core, the same pixels: tests/test_streaming.py checks
  it), other formats and CMYK JPEGs through PIL (reduced by `Image.draft`). With `array`, the
  image as a uint8 HWC array (simplejpeg's own, without a round trip through PIL)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img, s = _decode_scaled(data, where, scale, then)
  if array:
    return np.asarray(img), s
  return (Image.fromarray(img) if isinstance(img, np.ndarray) else img), s


def _decode_scaled(data, where, scale, then):
  """`decode_scaled`'s image: simplejpeg's array, or a PIL image."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  factor = next((f for f in (1 / 8, 1 / 4, 1 / 2) if f >= scale), 1.0)
  if data[:2] == b'\xff\xd8':  # A JPEG.
    try:
      import simplejpeg  # pylint: disable=g-import-not-at-top
      height, width, _, _ = simplejpeg.decode_jpeg_header(data)
      arr = simplejpeg.decode_jpeg(data, 'RGB', min_width=math.ceil(width * factor),
                                   min_height=math.ceil(height * factor))
      return arr, arr.shape[1] / width
    except Exception:  # pylint: disable=broad-except
      pass  # Not installed, CMYK, or damaged: PIL decodes it or names it.
    if factor < 1:
      try:
        img = Image.open(io.BytesIO(data))
        full = img.size[0]
        img.draft('RGB', (max(1, int(img.size[0] * factor)), max(1, int(img.size[1] * factor))))
        img = img.convert('RGB')
        return img, img.size[0] / full
      except Exception:  # pylint: disable=broad-except
        pass
  return decode(data, where, then=then), 1.0
