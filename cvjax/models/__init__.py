"""The model zoo: `create_model(config.model, ...)` builds a Flax module from a config. Each
family's module turns its `model` block into the module and checks the fields only it has
(`from_config`); the fields every family has are checked here."""

from cvjax.errors import UserError
from cvjax.models import airbench
from cvjax.models import alexnet
from cvjax.models import common
from cvjax.models import lenet
from cvjax.models import resnet_cifar
from cvjax.models import resnet_imagenet
from cvjax.models import vgg
# The modules, for code that builds one without a config.
from cvjax.models.airbench import Airbench  # pylint: disable=unused-import
from cvjax.models.alexnet import AlexNet  # pylint: disable=unused-import
from cvjax.models.lenet import LeNet5, LeNet5Paper  # pylint: disable=unused-import
from cvjax.models.resnet_cifar import CifarResNet  # pylint: disable=unused-import
from cvjax.models.resnet_imagenet import ResNet  # pylint: disable=unused-import
from cvjax.models.vgg import VGG  # pylint: disable=unused-import

MODELS = {'lenet5': lenet.from_config, 'resnet_cifar': resnet_cifar.from_config,
          'resnet': resnet_imagenet.from_config, 'alexnet': alexnet.from_config,
          'vgg': vgg.from_config, 'airbench': airbench.from_config}


def create_model(cfg, *, num_classes, dtype, remat=False, conv_general_dilated=None):
  """Builds the module named by `cfg.name`; raises UserError on bad settings.

  `remat` (the config's train.remat) re-computes activations in the backward pass;
  None: only for very deep CIFAR ResNets. `conv_general_dilated` is the convolution every
  conv layer calls (cvjax.ops.convolution.for_config); None keeps the model's default.
  """
  if cfg.name not in MODELS:
    raise UserError(f'unknown model.name={cfg.name!r}; expected one of {sorted(MODELS)}.')
  if cfg.activation not in common.ACTIVATIONS:
    raise UserError(f'unknown model.activation={cfg.activation!r}; '
                    f'expected one of {sorted(common.ACTIVATIONS)}.')
  if remat is None:
    remat = resnet_cifar.very_deep(cfg)
  if remat and cfg.name != 'resnet_cifar':
    raise UserError(f'train.remat is implemented for resnet_cifar, not {cfg.name}.')
  kw = {'remat': True} if remat else {}
  if conv_general_dilated is not None:
    kw['conv_general_dilated'] = conv_general_dilated
  return MODELS[cfg.name](cfg, num_classes=num_classes, dtype=dtype, **kw)
