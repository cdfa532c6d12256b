"""cvjax.tools.cpu_peak: the CPU's peak FLOP/s from canned `lscpu` / /proc/cpuinfo text of each
CPU kind it knows (the benchmark's fraction-of-peak column is only as right as this)."""

import pytest

from cvjax.tools import cpu_peak

AVX512 = 'fma avx2 avx512f avx512dq avx512bw avx512vl'


def lscpu(vendor, family, model, cores, flags, max_mhz=None, sockets=1, threads=1):
  text = (f'Architecture:            x86_64\nCPU(s):                  {cores * sockets * threads}\n'
          f'Vendor ID:               {vendor}\nModel name:              test cpu\n'
          f'CPU family:              {family}\nModel:                   {model}\n'
          f'Thread(s) per core:      {threads}\nCore(s) per socket:      {cores}\n'
          f'Socket(s):               {sockets}\n')
  if max_mhz:
    text += f'CPU max MHz:             {max_mhz:.4f}\nCPU min MHz:             400.0000\n'
  return text + f'Flags:                   fpu sse sse2 avx {flags}\n'


def cpuinfo(mhz, flags='', processors=1, vendor='AuthenticAMD', family=25, model=17):
  return ''.join(f'processor\t: {i}\nvendor_id\t: {vendor}\ncpu family\t: {family}\n'
                 f'model\t\t: {model}\ncpu MHz\t\t: {mhz}\nphysical id\t: 0\nsiblings\t: '
                 f'{processors}\ncore id\t\t: {i // 2}\nflags\t\t: {flags}\n\n'
                 for i in range(processors))


@pytest.mark.parametrize('name,lscpu_text,cpuinfo_text,kind,f32,bf16,peak_f32', [
    # The KVM Zen 4 (EPYC 9004): lscpu has no MHz, /proc/cpuinfo the nominal 2596 MHz.
    ('zen4', lscpu('AuthenticAMD', 25, 17, 2, AVX512 + ' avx512_bf16'), cpuinfo(2596.144),
     'AMD Zen 4', 32, 64, 2 * 32 * 2596.144 / 1e3),
    # Zen 5 (EPYC 9005, family 26): full 512-bit FMAs.
    ('zen5', lscpu('AuthenticAMD', 26, 2, 2, AVX512 + ' avx512_bf16', 4100), '',
     'AMD Zen 5', 64, 128, 2 * 64 * 4.1),
    # Zen 3 (EPYC 7003): AVX2, 2 x 256-bit FMA; no bfloat16 instructions.
    ('zen3', lscpu('AuthenticAMD', 25, 1, 2, 'fma avx2', 3529.052), '',
     'AMD Zen 3', 32, 32, 2 * 32 * 3.529052),
    # Sapphire Rapids, 2 sockets of 4 cores with SMT: 8 physical cores, AMX for bfloat16.
    ('sapphire_rapids', lscpu('GenuineIntel', 6, 143, 4, AVX512 + ' avx512_bf16 amx_bf16 '
                              'amx_tile', 3800, sockets=2, threads=2), '',
     'AVX-512 (2 FMA units)', 64, 2048, 8 * 64 * 3.8),
    # An AVX2 Intel seen through /proc/cpuinfo only (no lscpu): 4 processors, 2 cores.
    ('haswell', '', cpuinfo(2300.0, 'fpu sse avx fma avx2', 4, 'GenuineIntel', 6, 63),
     'AVX2 + FMA', 32, 32, 2 * 32 * 2.3),
])
def test_peak_of_each_cpu_kind(name, lscpu_text, cpuinfo_text, kind, f32, bf16, peak_f32):
  cpu = cpu_peak.parse(lscpu_text, cpuinfo_text)
  assert cpu_peak.kind(cpu) == kind, name
  assert cpu_peak.flops_per_cycle(cpu, 'float32') == f32
  assert cpu_peak.flops_per_cycle(cpu, 'bfloat16') == bf16
  assert cpu_peak.peak_gflops(cpu) == pytest.approx(peak_f32)
  assert cpu_peak.peak_gflops(cpu, 'bfloat16') == pytest.approx(peak_f32 * bf16 / f32)
  assert f'{f32} float32 FLOP/cycle' in cpu_peak.describe(cpu)


def test_the_max_clock_wins_over_the_current_one():
  # lscpu's nominal maximum, not /proc/cpuinfo's momentary clock of one core.
  cpu = cpu_peak.parse(lscpu('AuthenticAMD', 25, 1, 2, 'fma avx2', 3500), cpuinfo(1800.0))
  assert (cpu.mhz, cpu.mhz_source) == (3500, 'lscpu CPU max MHz')


def test_this_cpu_has_a_finite_peak():
  cpu = cpu_peak.this_cpu()
  if cpu is None:
    pytest.skip('neither lscpu nor /proc/cpuinfo here')
  assert cpu.cores >= 1 and cpu_peak.peak_gflops(cpu) > 0
