"""What the training loop sees of either pipeline (`Input`), and the pieces the memory and
streaming pipelines share: the eval crop count, the data fingerprint a checkpoint records and
ImageNet's normalisation."""

import dataclasses
import hashlib
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass
class Input:
  """What the training loop sees of either pipeline: device-resident arrays put once, the
  batch arguments of the jitted train and eval steps, and the pure functions the steps build
  their input with (so the steps never ask which pipeline fed them)."""
  pipeline: str  # 'memory' | 'streaming'
  num_train: int
  class_names: list
  image_shape: tuple  # One model input, HWC.
  train_data: dict  # numpy; the train step's `data` (the whole split, or only mean/std).
  test_data: dict  # numpy; the eval step's `data`.
  # (start_step, seeds=None) -> each train step's batch from `start_step` on, in order: the one
  # way batches reach the train step (the loop stacks the next k for k steps per call and places
  # them on the devices: cvjax/train.py, place_batch). `seeds` (default: config.seed) set the
  # data order; in memory a tree of seeds or arrays of them, each leaf drawn in its own order
  # ([*leaf shape, batch]: a population's members). Step s's batch depends on (seed, s) alone,
  # so a resumed run continues the same sequence.
  # Epochs: `num_train // batch_size` steps in both pipelines (experiment.steps_for). In memory
  # each epoch is a new permutation whose last partial batch is dropped (those examples sit that
  # epoch out); streamed, the examples are one endless reshuffled sequence cut into batches
  # across epoch ends (none dropped; a batch may hold examples of two epochs, and the schedule's
  # epoch ends at, or up to a batch before, the stream's).
  train_batches: Callable
  eval_batches: Callable  # () -> iterator of the eval step's batch arguments, every example once.
  # (train_data, batch, rng, *, sharding, dtype) -> (normalised, augmented images, labels).
  make_train_batch: Callable
  # (test_data, batch, *, sharding, dtype) -> (normalised images, labels, mask of real examples).
  make_eval_batch: Callable
  test_labels: Any  # int array [num_test].
  test_images: Any  # test_images[i]: uint8 HWC, for the figure of mistakes.
  fingerprint: dict  # What a checkpoint records of its data (see `fingerprint`).
  eval_padding: int = 0  # 10-crop evaluation crops from images padded by this.
  # In memory: (seed, step) -> that step's example indices in the seed's data order, any step
  # (what `train_batches` yields; the memory estimate reads its shape); None when streamed.
  train_indices: Callable = None

  @property
  def num_classes(self):
    return len(self.class_names)

  @property
  def num_test(self):
    return len(self.test_labels)


# The eval fields as the pipelines and the eval step read them; checked, with how they
# combine, by cvjax.config_checks.check_eval before a run builds anything.
def eval_crops(config):
  return config.eval.crops


def eval_flip(config):
  """Whether evaluation averages the logits of each image and its mirror image (`eval.flip`)."""
  return config.eval.flip


def eval_translate(config):
  """Pixels of the shifted test views (`eval.translate`, with eval.flip; 0: none)."""
  return config.eval.translate


def fingerprint(class_names, train_labels, test_labels):
  """What a checkpoint records of its data, so a run does not resume on other data: the
  classes, the split sizes and a hash of the labels (cheap, and different for different
  datasets). Not the path (moved data still resumes) nor the name (which only labels it)."""
  labels = hashlib.sha256(np.asarray(train_labels, np.int32).tobytes())
  labels.update(np.asarray(test_labels, np.int32).tobytes())
  return {'class_names': list(class_names), 'num_train': len(train_labels),
          'num_test': len(test_labels), 'labels_sha256': labels.hexdigest()[:16]}


def imagenet_stats():
  return (np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 1, 1, 3),
          np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 1, 1, 3))
