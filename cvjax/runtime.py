"""XLA settings that make the CPU step faster; applied before JAX starts its backend.

XLA:CPU's "ynn" fusions slow down convolution-heavy training steps: ResNet-20 trained
1.37-1.52x faster with them off (cvjax.benchmark, README). Set CVJAX_XLA_DEFAULTS=0 to
leave XLA_FLAGS untouched.
"""

import os

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=',)


def set_xla_flags():
  if os.environ.get('CVJAX_XLA_DEFAULTS', '1') == '0':
    return
  flags = os.environ.get('XLA_FLAGS', '')
  for flag in CPU_FLAGS:
    if flag.split('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  os.environ['XLA_FLAGS'] = flags
