"""TrivialAugment (Müller & Hutter 2021) in its "wide" search space, on PIL images in the
streaming pipeline's host workers, as torchvision's transforms.TrivialAugmentWide: one
operation drawn uniformly from 14, at a magnitude drawn uniformly from 31 steps, with a random
sign where the operation has one. Its draws come from the worker's per-example generator, so
the augmentation is a function of (seed, step) like the crops. No jax here: grain workers
import this module.
"""

import numpy as np

NUM_BINS = 31
SIGNED = ('shear_x', 'shear_y', 'translate_x', 'translate_y', 'rotate', 'brightness', 'color',
          'contrast', 'sharpness')
# Each operation's largest magnitude (torchvision's wide space); None: no magnitude.
MAX_MAGNITUDE = {
    'identity': None, 'shear_x': 0.99, 'shear_y': 0.99, 'translate_x': 32.0,
    'translate_y': 32.0, 'rotate': 135.0, 'brightness': 0.99, 'color': 0.99, 'contrast': 0.99,
    'sharpness': 0.99, 'posterize': None, 'solarize': None, 'autocontrast': None,
    'equalize': None,
}
OPS = tuple(MAX_MAGNITUDE)


def apply(img, op, magnitude):
  """`op` at `magnitude` (signed) on a PIL image; geometric operations fill with black and
  sample the nearest pixel, as torchvision's defaults."""
  from PIL import Image, ImageEnhance, ImageOps  # pylint: disable=g-import-not-at-top
  nearest = Image.Resampling.NEAREST
  fill = (0,) * len(img.getbands())
  affine = {'shear_x': (1, magnitude, 0, 0, 1, 0), 'shear_y': (1, 0, 0, magnitude, 1, 0),
            'translate_x': (1, 0, -magnitude, 0, 1, 0),
            'translate_y': (1, 0, 0, 0, 1, -magnitude)}
  if op in affine:
    return img.transform(img.size, Image.Transform.AFFINE, affine[op], nearest, fillcolor=fill)
  if op == 'rotate':
    return img.rotate(magnitude, nearest, fillcolor=fill)
  enhance = {'brightness': ImageEnhance.Brightness, 'color': ImageEnhance.Color,
             'contrast': ImageEnhance.Contrast, 'sharpness': ImageEnhance.Sharpness}
  if op in enhance:
    return enhance[op](img).enhance(1.0 + magnitude)
  if op == 'posterize':
    return ImageOps.posterize(img, int(magnitude))
  if op == 'solarize':
    return ImageOps.solarize(img, magnitude)
  if op == 'autocontrast':
    return ImageOps.autocontrast(img)
  if op == 'equalize':
    return ImageOps.equalize(img)
  return img


def sample(rng):
  """(operation, signed magnitude) drawn as TrivialAugmentWide draws them."""
  op = OPS[int(rng.integers(len(OPS)))]
  step = int(rng.integers(NUM_BINS))
  if op == 'posterize':  # 8 bits down to 2.
    return op, float(8 - int(round(step / ((NUM_BINS - 1) / 6))))
  if op == 'solarize':  # Threshold 255 down to 0.
    return op, float(np.linspace(255.0, 0.0, NUM_BINS)[step])
  if MAX_MAGNITUDE[op] is None:
    return op, 0.0
  magnitude = float(np.linspace(0.0, MAX_MAGNITUDE[op], NUM_BINS)[step])
  if op in SIGNED and rng.integers(2):
    magnitude = -magnitude
  return op, magnitude


def trivial_augment_wide(img, rng):
  return apply(img, *sample(rng))
