"""The model zoo: `create_model(config.model, ...)` builds a Flax module from a config."""

from cvjax.errors import UserError
from cvjax.models import airbench
from cvjax.models import common
from cvjax.models import resnet_cifar
from cvjax.models.alexnet import AlexNet
from cvjax.models.lenet import LeNet5, LeNet5Paper
from cvjax.models.resnet_cifar import CifarResNet
from cvjax.models.resnet_imagenet import STAGES, ResNet
from cvjax.models.vgg import CONFIGS as VGG_CONFIGS, VGG


def _lenet5(cfg, **kw):
  variant = cfg.get('variant', 'modern')
  if variant not in ('modern', 'paper'):
    raise UserError(f'unknown model.variant={variant!r} for lenet5; expected modern or paper.')
  return (LeNet5Paper if variant == 'paper' else LeNet5)(activation=cfg.activation, **kw)


def _very_deep_cifar_resnet(cfg):
  """Where unscanned XLA compilation takes minutes (ResNet-1202): the default for scanning
  blocks and for remat when the config leaves them unset."""
  return cfg.name == 'resnet_cifar' and cfg.depth > 110


def _resnet_cifar(cfg, **kw):
  resnet_cifar.blocks_per_stage(cfg.depth)  # Checked before the model is built.
  return CifarResNet(depth=cfg.depth, residual=cfg.residual, activation=cfg.activation,
                     batch_norm=cfg.batch_norm, bn_momentum=cfg.bn_momentum,
                     zero_init_residual=cfg.zero_init_residual,
                     scan_blocks=(_very_deep_cifar_resnet(cfg) if cfg.get('scan_blocks') is None
                                  else cfg.scan_blocks), **kw)


def _resnet(cfg, **kw):
  if cfg.depth not in STAGES:
    raise UserError(f'model.depth={cfg.depth} is not an ImageNet ResNet depth; expected one of '
                    f'{sorted(STAGES)}.')
  stride = cfg.get('stride_in_bottleneck', '1x1')
  if stride not in ('1x1', '3x3'):
    raise UserError(f'model.stride_in_bottleneck={stride!r}; expected 1x1 (the paper, v1) or '
                    '3x3 (torchvision, v1.5).')
  return ResNet(depth=cfg.depth, residual=cfg.residual, activation=cfg.activation,
                bn_momentum=cfg.bn_momentum, zero_init_residual=cfg.zero_init_residual,
                stride_in_bottleneck=stride, **kw)


def _alexnet(cfg, **kw):
  variant = cfg.get('variant', 'paper')
  if variant not in ('paper', 'torchvision'):
    raise UserError(f'unknown model.variant={variant!r} for alexnet; expected paper or '
                    'torchvision.')
  if cfg.groups not in (1, 2):
    raise UserError(f'model.groups={cfg.groups}: AlexNet has 1 (one tower) or 2 (the paper).')
  if variant == 'torchvision' and cfg.groups != 1:
    raise UserError('model.variant=torchvision is a one-tower net: set model.groups=1 '
                    '(configs/alexnet.py:imagenet_torchvision does).')
  return AlexNet(variant=variant, groups=cfg.groups, activation=cfg.activation,
                 dropout_rate=cfg.dropout_rate, **kw)


def _vgg(cfg, **kw):
  if cfg.depth not in VGG_CONFIGS:
    raise UserError(f'model.depth={cfg.depth} is not a VGG depth; expected one of '
                    f'{sorted(VGG_CONFIGS)} (configurations A, B, D, E).')
  return VGG(depth=cfg.depth, batch_norm=cfg.batch_norm, activation=cfg.activation,
             dropout_rate=cfg.dropout_rate, bn_momentum=cfg.bn_momentum, **kw)


def _airbench(cfg, **kw):
  widths = tuple(cfg.widths)
  if len(widths) != 3 or not all(isinstance(w, int) and w > 0 for w in widths):
    raise UserError(f'model.widths={cfg.widths!r}; expected three positive integers, the '
                    'widths of the conv groups (airbench94: (64, 256, 256)).')
  if not 0 <= cfg.bn_momentum < 1:
    raise UserError(f'model.bn_momentum={cfg.bn_momentum!r}; expected the share of the running '
                    'average kept per step in [0, 1) (Flax convention; airbench94: 0.6).')
  return airbench.Airbench(widths=widths, activation=cfg.activation, bn_momentum=cfg.bn_momentum,
                           logit_scale=cfg.logit_scale, whiten=cfg.whiten, dirac=cfg.dirac,
                           **kw)


MODELS = {'lenet5': _lenet5, 'resnet_cifar': _resnet_cifar, 'resnet': _resnet,
          'alexnet': _alexnet, 'vgg': _vgg, 'airbench': _airbench}


def create_model(cfg, *, num_classes, dtype, remat=False, conv_general_dilated=None):
  """Builds the module named by `cfg.name`; raises UserError on bad settings.

  `remat` (the config's train.remat) re-computes activations in the backward pass;
  None: only for very deep CIFAR ResNets. `conv_general_dilated` is the convolution every
  conv layer calls (cvjax.ops.convolution.for_config); None keeps the model's default.
  """
  if cfg.name not in MODELS:
    raise UserError(f'unknown model.name={cfg.name!r}; expected one of {sorted(MODELS)}.')
  if cfg.get('activation') not in common.ACTIVATIONS:
    raise UserError(f'unknown model.activation={cfg.get("activation")!r}; '
                    f'expected one of {sorted(common.ACTIVATIONS)}.')
  if remat is None:
    remat = _very_deep_cifar_resnet(cfg)
  if remat and cfg.name != 'resnet_cifar':
    raise UserError(f'train.remat is implemented for resnet_cifar, not {cfg.name}.')
  kw = {'remat': True} if remat else {}
  if conv_general_dilated is not None:
    kw['conv_general_dilated'] = conv_general_dilated
  return MODELS[cfg.name](cfg, num_classes=num_classes, dtype=dtype, **kw)
