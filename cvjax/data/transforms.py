"""The device-side array transforms of a batch, pure jnp functions run inside the jitted steps
for in-memory and streamed input alike: normalisation; random crops from a padded image and
horizontal flips (the in-memory pipeline's, per example); random erasing (Zhong et al. 2017) per
image, and Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) per batch, as torchvision's
reference scripts do them (references/classification/transforms.py: RandomMixup, RandomCutmix;
and transforms.RandomErasing); and the test-time views (ten crops, shifted views).

Each random transform is a function of its rng only: the train step folds the step into it, so
a resumed run draws the same crops, flips, boxes and mixing weights. Loading and decoding (host,
once) live in data/memory.py and data/streaming.py.
"""

import math

import jax
import jax.numpy as jnp


def normalize(images_u8, mean, std, dtype=jnp.float32):
  """uint8 images to `(x / 255 - mean) / std` in `dtype` (the statistics in [0, 1] units)."""
  return ((images_u8.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def augment(images, rng, *, crop_padding, flip, pad_mode='constant', flips=None):
  """Random crop from a padded image and random horizontal flip, per example; `flips` (bool
  [B]), when given, says which images to flip instead.

  Runs on normalised images, so the zero padding is the mean colour as in the paper;
  `pad_mode='reflect'` mirrors the border instead (airbench94's translate).
  """
  b, h, w, c = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  if crop_padding:
    p = crop_padding
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode=pad_mode)
    offsets = jax.random.randint(crop_rng, (b, 2), 0, 2 * p + 1)
    images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
        padded, offsets)
  if flip:
    if flips is None:
      flips = jax.random.bernoulli(flip_rng, 0.5, (b,))
    images = jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)
  return images


def alternate_flips(indices, epoch):
  """airbench94's derandomised flips: whether each image of `indices` is mirrored in `epoch`.
  A fixed half of the images (by a hash of the index) in even epochs, the other half in odd
  ones, so every image is mirrored in exactly every other epoch."""
  h = indices.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)  # Knuth's multiplicative hash.
  first = (h >> 16) & 1
  return (first ^ (epoch % 2).astype(jnp.uint32)) == 1


def random_erase(x, rng, prob, *, scale=(0.02, 0.33), ratio=(0.3, 3.3), attempts=10):
  """With probability `prob` per image, a random box set to 0 (the mean, after normalisation),
  as torchvision's RandomErasing(p=prob) with its defaults: box area a `scale` fraction of the
  image, aspect ratio log-uniform in `ratio`; of `attempts` draws the first box that fits is
  used, none if none fits."""
  b, h, w, _ = x.shape
  k_apply, k_area, k_ratio, k_top, k_left = jax.random.split(rng, 5)
  area = h * w * jax.random.uniform(k_area, (b, attempts), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (b, attempts), minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  box_h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  box_w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (box_h < h) & (box_w < w)
  first = jnp.argmax(fits, axis=1)[:, None]  # The first attempt that fits.
  box_h = jnp.take_along_axis(box_h, first, 1)[:, 0]
  box_w = jnp.take_along_axis(box_w, first, 1)[:, 0]
  erase = jax.random.bernoulli(k_apply, prob, (b,)) & jnp.any(fits, axis=1)
  top = jnp.floor(jax.random.uniform(k_top, (b,)) * (h - box_h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (b,)) * (w - box_w + 1)).astype(jnp.int32)
  rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None]) &
            (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
  return jnp.where((inside & erase[:, None, None])[..., None], jnp.zeros((), x.dtype), x)


def mix(x, labels, rng, *, mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, cutmix_prob=0.5):
  """Mixup or CutMix of the batch with itself rolled by one, as torchvision's RandomMixup and
  RandomCutmix: with probability `prob` the batch is mixed; where both alphas are set, CutMix
  with probability `cutmix_prob`, else Mixup (torchvision's RandomChoice of the two: 0.5).
  The mixing weight is Beta(alpha, alpha); CutMix's is the area left of the pasted box.

  Returns (images, the rolled labels, the per-example weight of `labels`): the loss is
  weight * CE(labels) + (1 - weight) * CE(rolled labels), i.e. the cross-entropy with the
  mixed one-hot targets. An unmixed batch comes back as it was, with weight 1."""
  if not (mixup_alpha or cutmix_alpha):
    raise ValueError('mix needs mixup_alpha or cutmix_alpha > 0.')
  b, h, w, _ = x.shape
  k_apply, k_which, k_mixup, k_cutmix, k_y, k_x = jax.random.split(rng, 6)
  rolled_x, rolled_labels = jnp.roll(x, 1, axis=0), jnp.roll(labels, 1, axis=0)
  candidates = []  # (weight, images) of each method.
  if mixup_alpha:
    lam = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha)
    candidates.append((lam, (lam * x + (1 - lam) * rolled_x).astype(x.dtype)))
  if cutmix_alpha:
    lam = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha)
    cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
    r = 0.5 * jnp.sqrt(1.0 - lam)
    half_h, half_w = (r * h).astype(jnp.int32), (r * w).astype(jnp.int32)
    y1, y2 = jnp.maximum(cy - half_h, 0), jnp.minimum(cy + half_h, h)
    x1, x2 = jnp.maximum(cx - half_w, 0), jnp.minimum(cx + half_w, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
    lam = 1.0 - ((y2 - y1) * (x2 - x1)).astype(jnp.float32) / (h * w)
    candidates.append((lam, jnp.where(box[None, :, :, None], rolled_x, x)))
  lam, mixed = candidates[0]
  if len(candidates) == 2:
    use_cutmix = jax.random.bernoulli(k_which, cutmix_prob)
    lam = jnp.where(use_cutmix, candidates[1][0], lam)
    mixed = jnp.where(use_cutmix, candidates[1][1], mixed)
  if prob < 1:
    applied = jax.random.bernoulli(k_apply, prob)
    lam, mixed = jnp.where(applied, lam, 1.0), jnp.where(applied, mixed, x)
  return mixed, rolled_labels, jnp.full((b,), lam, jnp.float32)


def ten_crop(images, size):
  """The four corner crops, the centre crop and their horizontal flips of a batch of
  images: [10, B, size, size, C] (Krizhevsky et al. 2012; He et al. 2015's 10-crop test)."""
  _, h, w, _ = images.shape
  corners = ((0, 0), (0, w - size), (h - size, 0), (h - size, w - size),
             ((h - size) // 2, (w - size) // 2))
  crops = [images[:, y:y + size, x:x + size] for y, x in corners]
  return jnp.stack(crops + [c[:, :, ::-1] for c in crops])


def translate_views(images, pixels):
  """The images shifted by `pixels` towards the bottom-right and towards the top-left (the
  views of airbench94's test-time augmentation), the border reflected: [2, B, H, W, C]."""
  _, h, w, _ = images.shape
  p = pixels
  padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode='reflect')
  return jnp.stack([padded[:, :h, :w], padded[:, 2 * p:2 * p + h, 2 * p:2 * p + w]])
