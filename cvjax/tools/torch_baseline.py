"""The benchmark's PyTorch baseline: the same CIFAR ResNets / plain nets and LeNet-5, the same
optimizer, trained eagerly with channels_last. Only `cvjax.tools.benchmark --baseline=torch`
imports this; torch is optional (requirements-torch.txt)."""

import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class Block(nn.Module):
  def __init__(self, cin, cout, stride, residual, act):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.stride, self.extra, self.residual, self.act = stride, cout - cin, residual, act

  def forward(self, x):
    y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
    if self.residual:  # Option A: subsample and zero-pad channels.
      s = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
      if self.extra:
        s = F.pad(s, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
      y = y + s
    return self.act(y)


class CifarResNet(nn.Module):
  def __init__(self, depth, residual=True, num_classes=10):
    super().__init__()
    n, act = (depth - 2) // 6, nn.ReLU(inplace=False)
    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), act], 16
    for stage, cout in enumerate((16, 32, 64)):
      for b in range(n):
        layers.append(Block(cin, cout, 2 if stage and not b else 1, residual, act))
        cin = cout
    self.body = nn.Sequential(*layers)
    self.head = nn.Linear(64, num_classes)

  def forward(self, x):
    return self.head(self.body(x).mean((2, 3)))


class LeNet5(nn.Module):
  def __init__(self, num_classes=10):
    super().__init__()
    self.net = nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), nn.Tanh(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.Tanh(), nn.Linear(120, 84),
        nn.Tanh(), nn.Linear(84, num_classes))

  def forward(self, x):
    return self.net(x)


def build(name, depth=None, residual=True):
  if name == 'lenet5':
    return LeNet5()
  if name.startswith('imagenet_resnet'):  # torchvision's, the net cvjax.import_weights reads.
    import torchvision  # pylint: disable=g-import-not-at-top
    return getattr(torchvision.models, f'resnet{depth}')(num_classes=1000)
  return CifarResNet(depth, residual)


def benchmark(name, depth, residual, input_shape, batch_size, steps, warmup, dtype, lr=0.1):
  """Train and eval throughput of the PyTorch twin, on random inputs (like cvjax's benchmark)."""
  torch.manual_seed(0)
  model = build(name, depth, residual).to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
  h, w, c = input_shape
  x = torch.randn(batch_size, c, h, w).to(memory_format=torch.channels_last)
  y = torch.randint(0, 10, (batch_size,))
  autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16')

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast:
      loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

  model.train()
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    step()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  model.eval()
  with torch.no_grad(), autocast:
    model(x)
    t0 = time.perf_counter()
    for _ in range(5):
      model(x)
    eval_time = (time.perf_counter() - t0) / 5
  median = float(np.median(times))
  return {'train_images_per_s': batch_size / median, 'step_ms_median': 1e3 * median,
          'step_ms_p90': 1e3 * float(np.percentile(times, 90)),
          'eval_images_per_s': batch_size / eval_time}
