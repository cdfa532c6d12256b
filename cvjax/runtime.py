"""XLA settings that make the CPU step faster; applied before JAX starts its backend.

XLA:CPU's "ynn" (YNNPACK) fusions help reductions and elementwise work but slow down
convolution-heavy steps when they also take dots and convolutions. Keeping only the
reduce and eltwise kinds made the ResNet-20 train step 1.28x faster than with ynn off
(358 vs 279 img/s, cvjax.benchmark, README). Set CVJAX_XLA_DEFAULTS=0
to leave XLA_FLAGS untouched.
"""

import os

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=reduce,eltwise',)


def set_xla_flags():
  if os.environ.get('CVJAX_XLA_DEFAULTS', '1') == '0':
    return
  flags = os.environ.get('XLA_FLAGS', '')
  for flag in CPU_FLAGS:
    if flag.split('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  os.environ['XLA_FLAGS'] = flags
