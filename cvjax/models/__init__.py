"""The model zoo: `create_model(config.model, ...)` builds a Flax module from a config. Each
family's module turns its `model` block into the module and checks the fields only it has
(`from_config`); the fields every family has are checked here."""

import importlib

from cvjax.errors import UserError
from cvjax.models import common

# model.name -> the family's module, imported when a config names it: a run reads only its own.
FAMILIES = {'lenet5': 'lenet', 'resnet_cifar': 'resnet_cifar', 'resnet': 'resnet_imagenet',
            'alexnet': 'alexnet', 'vgg': 'vgg', 'airbench': 'airbench'}
# The modules, for code that builds one without a config (`models.ResNet(depth=18, ...)`).
CLASSES = {'Airbench': 'airbench', 'AlexNet': 'alexnet', 'LeNet5': 'lenet',
           'LeNet5Paper': 'lenet', 'CifarResNet': 'resnet_cifar', 'ResNet': 'resnet_imagenet',
           'VGG': 'vgg'}


def family(name):
  """The module of model.name `name`."""
  return importlib.import_module(f'cvjax.models.{FAMILIES[name]}')


def __getattr__(name):
  if name in CLASSES:
    return getattr(importlib.import_module(f'cvjax.models.{CLASSES[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def create_model(cfg, *, num_classes, dtype, remat=False, conv_general_dilated=None):
  """Builds the module named by `cfg.name`; raises UserError on bad settings.

  `remat` (the config's train.remat) re-computes activations in the backward pass;
  None: only for very deep CIFAR ResNets. `conv_general_dilated` is the convolution every
  conv layer calls (cvjax.ops.convolution.for_config); None keeps the model's default.
  """
  if cfg.name not in FAMILIES:
    raise UserError(f'unknown model.name={cfg.name!r}; expected one of {sorted(FAMILIES)}.')
  if cfg.activation not in common.ACTIVATIONS:
    raise UserError(f'unknown model.activation={cfg.activation!r}; '
                    f'expected one of {sorted(common.ACTIVATIONS)}.')
  if remat is None:
    remat = cfg.name == 'resnet_cifar' and family(cfg.name).very_deep(cfg)
  if remat and cfg.name != 'resnet_cifar':
    raise UserError(f'train.remat is implemented for resnet_cifar, not {cfg.name}.')
  kw = {'remat': True} if remat else {}
  if conv_general_dilated is not None:
    kw['conv_general_dilated'] = conv_general_dilated
  return family(cfg.name).from_config(cfg, num_classes=num_classes, dtype=dtype, **kw)
