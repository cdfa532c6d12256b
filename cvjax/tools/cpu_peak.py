"""The CPU's peak FLOP/s, from `lscpu` and /proc/cpuinfo: the roof the benchmark's FLOP/s are a
fraction of (docs/performance.md says how, and what it assumes).

  peak = physical cores x FLOP per cycle per core x clock

FLOP per cycle per core, float32: FMA pipes x their width in float32 lanes x 2 (an FMA is a
multiply and an add). The pipes are not in the CPU's flags, so they come from its vendor and
cpuid family/model:

  Intel with AVX-512 (Skylake-SP .. Sapphire Rapids, server parts): 2 x 512-bit = 64
  AMD Zen 4 (family 25, models 0x10-0x1f, 0x60-0x7f, 0xa0-0xaf): AVX-512 executed as two
      256-bit halves on 2 x 256-bit FMA pipes = 32
  AMD Zen 5 (family 26): full 512-bit datapath, 2 x 512-bit = 64
  AMD Zen 2 / Zen 3, Intel AVX2 (Haswell on): 2 x 256-bit = 32
  AMD Zen 1 (family 23 below model 0x30): 2 x 128-bit = 16
  AVX without FMA: a 256-bit add and a 256-bit multiply per cycle = 16; SSE only: 8

bfloat16: `avx512_bf16`'s VDPBF16PS does two bfloat16 products per float32 lane in one
instruction at the FMA's rate, twice float32's FLOP per cycle; AMX (`amx_bf16`, Sapphire
Rapids) does 1024 bfloat16 multiply-adds per cycle per core = 2048; without either, bfloat16
computes at float32's rate.

Clock: lscpu's "CPU max MHz" (the nominal maximum boost), else the "cpu MHz" /proc/cpuinfo
reports (virtual machines often give only this, the nominal clock). All-core boost under
AVX-512 load can sit below either, so the peak is an upper bound.
"""

import dataclasses
import os
import re
import subprocess


@dataclasses.dataclass(frozen=True)
class Cpu:
  vendor: str
  family: int
  model: int
  cores: int  # Physical cores: SMT siblings share a core's FMA pipes.
  mhz: float
  mhz_source: str
  flags: frozenset
  name: str = ''


def _field(text, *names):
  for name in names:
    m = re.search(rf'^{re.escape(name)}\s*:\s*(.+)$', text, re.MULTILINE)
    if m:
      return m.group(1).strip()
  return None


def parse(lscpu, cpuinfo):
  """A `Cpu` from the text of `lscpu` and of /proc/cpuinfo (either may be empty)."""
  vendor = _field(lscpu, 'Vendor ID') or _field(cpuinfo, 'vendor_id') or ''
  family = int(_field(lscpu, 'CPU family') or _field(cpuinfo, 'cpu family') or 0)
  model = int(_field(lscpu, 'Model') or _field(cpuinfo, 'model') or 0)
  flags = frozenset((_field(lscpu, 'Flags') or _field(cpuinfo, 'flags') or '').split())
  per_socket, sockets = _field(lscpu, 'Core(s) per socket'), _field(lscpu, 'Socket(s)')
  if per_socket and sockets:
    cores = int(per_socket) * int(sockets)
  else:  # /proc/cpuinfo: distinct (physical id, core id) pairs, else its processors.
    pairs = re.findall(r'^physical id\s*:\s*(\d+)\s*\n(?:.*\n)*?core id\s*:\s*(\d+)', cpuinfo,
                       re.MULTILINE)
    cores = len(set(pairs)) or len(re.findall(r'^processor\s*:', cpuinfo, re.MULTILINE)) or 1
  if mhz := _field(lscpu, 'CPU max MHz'):
    mhz, source = float(mhz), 'lscpu CPU max MHz'
  elif mhz := _field(cpuinfo, 'cpu MHz'):
    mhz, source = float(mhz), '/proc/cpuinfo cpu MHz'
  else:
    mhz, source = float('nan'), 'unknown'
  name = _field(lscpu, 'Model name') or _field(cpuinfo, 'model name') or ''
  return Cpu(vendor, family, model, cores, mhz, source, flags, name)


def kind(cpu):
  """The microarchitecture class the FMA pipes are taken from, e.g. 'AMD Zen 4'."""
  amd = cpu.vendor == 'AuthenticAMD'
  if amd and cpu.family == 26:
    return 'AMD Zen 5'
  if amd and cpu.family == 25:
    zen4 = 0x10 <= cpu.model <= 0x1f or 0x60 <= cpu.model <= 0x7f or 0xa0 <= cpu.model <= 0xaf
    return 'AMD Zen 4' if zen4 or 'avx512f' in cpu.flags else 'AMD Zen 3'
  if amd and cpu.family == 23:
    return 'AMD Zen 2' if cpu.model >= 0x30 else 'AMD Zen 1'
  if 'avx512f' in cpu.flags:
    return 'AVX-512 (2 FMA units)'
  if 'fma' in cpu.flags and 'avx2' in cpu.flags:
    return 'AVX2 + FMA'
  return 'AVX' if 'avx' in cpu.flags else 'SSE'


_F32_PER_CYCLE = {'AMD Zen 5': 64, 'AMD Zen 4': 32, 'AMD Zen 3': 32, 'AMD Zen 2': 32,
                  'AMD Zen 1': 16, 'AVX-512 (2 FMA units)': 64, 'AVX2 + FMA': 32, 'AVX': 16,
                  'SSE': 8}


def flops_per_cycle(cpu, dtype='float32'):
  """Peak FLOP per cycle of one core in `dtype` (float32 or bfloat16)."""
  f32 = _F32_PER_CYCLE[kind(cpu)]
  if dtype == 'float32':
    return f32
  if dtype != 'bfloat16':
    raise ValueError(f'dtype={dtype!r}; expected float32 or bfloat16')
  if 'amx_bf16' in cpu.flags:
    return 2048
  return 2 * f32 if 'avx512_bf16' in cpu.flags else f32


def peak_gflops(cpu, dtype='float32'):
  return cpu.cores * flops_per_cycle(cpu, dtype) * cpu.mhz / 1e3


def describe(cpu, dtype='float32'):
  """One line saying how the peak was computed."""
  return (f'{cpu.name or cpu.vendor} ({kind(cpu)}, family {cpu.family} model {cpu.model:#x}): '
          f'{cpu.cores} cores x {flops_per_cycle(cpu, dtype)} {dtype} FLOP/cycle x '
          f'{cpu.mhz:.0f} MHz ({cpu.mhz_source}) = {peak_gflops(cpu, dtype):.0f} GFLOP/s')


def this_cpu():
  """This machine's `Cpu` (Linux: lscpu and /proc/cpuinfo); None where neither can be read."""
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=True,
                           env={**os.environ, 'LC_ALL': 'C'}).stdout
  except (OSError, subprocess.CalledProcessError):
    lscpu = ''
  try:
    with open('/proc/cpuinfo') as f:
      cpuinfo = f.read()
  except OSError:
    cpuinfo = ''
  if not lscpu and not cpuinfo:
    return None
  return parse(lscpu, cpuinfo)
