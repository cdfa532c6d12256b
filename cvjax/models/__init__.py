"""The model zoo: `create_model(config.model, ...)` builds a Flax module from a config."""

from cvjax.errors import UserError
from cvjax.models import common
from cvjax.models.lenet import LeNet5
from cvjax.models.resnet_cifar import CifarResNet


def _lenet5(cfg, **kw):
  return LeNet5(activation=cfg.activation, **kw)


def _resnet_cifar(cfg, **kw):
  if cfg.depth < 8 or (cfg.depth - 2) % 6:
    raise UserError(
        f'model.depth={cfg.depth} is not a CIFAR ResNet depth: it must be 6n+2 with n >= 1 '
        '(the paper uses 20, 32, 44, 56, 110 and 1202).')
  return CifarResNet(depth=cfg.depth, residual=cfg.residual, activation=cfg.activation,
                     batch_norm=cfg.batch_norm, bn_momentum=cfg.bn_momentum,
                     zero_init_residual=cfg.zero_init_residual, **kw)


MODELS = {'lenet5': _lenet5, 'resnet_cifar': _resnet_cifar}


def create_model(cfg, *, num_classes, dtype):
  """Builds the module named by `cfg.name`; raises UserError on bad settings."""
  if cfg.name not in MODELS:
    raise UserError(f'unknown model.name={cfg.name!r}; expected one of {sorted(MODELS)}.')
  if cfg.get('activation') not in common.ACTIVATIONS:
    raise UserError(f'unknown model.activation={cfg.get("activation")!r}; '
                    f'expected one of {sorted(common.ACTIVATIONS)}.')
  return MODELS[cfg.name](cfg, num_classes=num_classes, dtype=dtype)
