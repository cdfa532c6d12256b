"""2-D convolutions on CPU: oneDNN's kernels where available, else XLA's in a fast form.

Every model takes the convolution it is built with (its `conv_general_dilated` field, the
function Flax's `nn.Conv` calls); `for_config` decides it once per run, and `compute_dtype`
the dtype the run computes in. On CPU, float32 NHWC/HWIO convolutions then go to oneDNN
through XLA FFI custom calls (cvjax.ops.onednn:
forward, and one call for the input and weight gradients), the kernels PyTorch uses, faster
than XLA:CPU's own (docs/performance.md). `train.native_conv=False`, or CVJAX_NATIVE=0,
keeps XLA's convolutions, as does any convolution the oneDNN kernel does not take
(dilation, negative padding). bfloat16 ones (`train.compute_dtype=bfloat16`) go to oneDNN
where the CPU has bfloat16 instructions (avx512_bf16, AMX); on other CPUs such a run computes
in float32 (`compute_dtype`), since XLA:CPU's bfloat16 convolutions are slower still.

XLA's path is `conv2d` below, a convolution whose backward pass is written out in the form
XLA:CPU runs fast.

Autodiff of `lax.conv_general_dilated` gives XLA two convolutions with permuted
dimension labels (input gradient: kernel `01oi`; weight gradient: `f01b_i01o->01bf`).
At the top level of a program XLA:CPU rewrites them into the NHWC/HWIO form its Eigen
kernels take; inside a loop body (`nn.scan` over blocks) it does not, and falls back
to a naive loop emitter that is 20-30x slower. Here the two gradients are stated
directly in the NHWC/HWIO form, with the transposes explicit, so every program gets
the fast kernels. Same numbers as autodiff (tests/test_convolution.py).

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (Flax's
`nn.Conv(conv_general_dilated=...)`). It routes to `conv2d` on CPU only, where the
measurements were made; other backends, and cases other than an ungrouped, undilated
2-D NHWC/HWIO convolution, go to lax unchanged. Being a custom_vjp, `conv2d` supports
reverse-mode differentiation only (jax.grad, jax.vjp), not jax.jvp.
"""

import functools

from absl import logging
import jax
import jax.numpy as jnp
from jax import lax

from cvjax.ops import onednn

_DIMS = ('NHWC', 'HWIO', 'NHWC')


def native_available():
  """Whether oneDNN convolutions can run in this process: a CPU backend and the library."""
  return jax.default_backend() == 'cpu' and onednn.available()


def native_for(config):
  """Whether this run's convolutions go to oneDNN: where `train.native_conv` (default True)
  allows it, the backend is CPU, the library loads and the compute dtype is float32, or
  bfloat16 on a CPU whose bfloat16 instructions oneDNN uses (avx512_bf16 or AMX)."""
  if not (config.train.native_conv and native_available()):
    return False
  dtype = compute_dtype(config)
  return dtype == jnp.float32 or (dtype == jnp.bfloat16 and onednn.bf16())


def compute_dtype(config):
  """The dtype this run computes in: `train.compute_dtype`, except bfloat16 on a CPU whose
  convolutions would go to oneDNN but which has no bfloat16 instructions (AVX2 only): there
  XLA's bfloat16 convolutions are far slower than float32 ones, so the run computes in
  float32 and the log says so once. The one place that decides it (models, inputs, steps)."""
  dtype = jnp.dtype(config.train.compute_dtype)
  if (dtype == jnp.bfloat16 and config.train.native_conv and native_available()
      and not onednn.bf16()):
    _log_choice('train.compute_dtype=bfloat16, but oneDNN has no bfloat16 kernels on this CPU '
                '(no avx512_bf16 or AMX): computing in float32', warn=True)
    return jnp.dtype(jnp.float32)
  return dtype


def for_config(config):
  """The `conv_general_dilated` that models of this run are built with (logged once)."""
  wanted = config.train.native_conv
  dtype = compute_dtype(config)
  native, warn = native_for(config), False
  if native and dtype == jnp.bfloat16:
    why = (f'oneDNN {onednn.version()} in bfloat16 on CPU (kernel {onednn.bf16_kernel()}; '
           'float32 accumulation)')
  elif native:
    why = f'oneDNN {onednn.version()} (float32 on CPU)'
  elif jax.default_backend() != 'cpu':
    why = f"XLA's ({jax.default_backend()} backend)"
  elif not wanted:
    why = "XLA's (train.native_conv=False)"
  else:  # Slower on CPU, and not what the config asked for: a warning.
    why = "XLA's, slower on CPU (the oneDNN library is unavailable: see the warning above)"
    warn = True
  _log_choice(why, warn)
  return functools.partial(conv_general_dilated, native=True) if native else conv_general_dilated


@functools.cache
def _log_choice(why, warn=False):
  (logging.warning if warn else logging.info)('Convolutions: %s.', why)


def _conv(x, w, strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
  return lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, w, strides, padding):
  """NHWC input, HWIO kernel, explicit padding ((top, bottom), (left, right))."""
  return _conv(x, w, strides, padding)


def _conv2d_fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _conv2d_bwd(strides, padding, residuals, dy):
  x, w = residuals
  kernel = w.shape[:2]
  dilated_out = [(m - 1) * s + 1 for m, s in zip(dy.shape[1:3], strides)]
  # Input gradient: dy (dilated by the stride) correlated with the flipped kernel,
  # input and output channels swapped.
  dx_pad = [(k - lo - 1, n + k - 1 - d - (k - lo - 1))
            for n, k, d, (lo, _) in zip(x.shape[1:3], kernel, dilated_out, padding)]
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = _conv(dy, w_t, (1, 1), dx_pad, lhs_dilation=strides)
  # Weight gradient: a convolution with the batch as the contracted feature axis,
  # input channels as its batch and dy as the (stride-dilated) kernel.
  dw_pad = [(lo, d - n + k - lo - 1)
            for n, k, d, (lo, _) in zip(x.shape[1:3], kernel, dilated_out, padding)]
  dw = _conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), dw_pad,
             rhs_dilation=strides)
  return dx, dw.transpose(1, 2, 0, 3)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def onednn_conv2d(x, w, strides, padding, groups):
  """`conv2d` on oneDNN (float32 or bfloat16; `groups` input-channel groups)."""
  return onednn.forward(x, w, strides, padding, groups)


def _onednn_fwd(x, w, strides, padding, groups):
  # With symbolic zeros, x.perturbed says whether the input gradient is wanted at all (not
  # for the stem, whose input is the image); it travels as the residuals' structure,
  # which is static in the backward rule.
  y = onednn.forward(x.value, w.value, strides, padding, groups)
  residuals = (x.value, w.value)
  return y, residuals if x.perturbed else residuals + (None,)


def _onednn_bwd(strides, padding, groups, residuals, dy):
  x, w, need_dx = *residuals[:2], len(residuals) == 2
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    return jnp.zeros_like(x), jnp.zeros_like(w)
  dx, dw = onednn.backward(x, w, dy, strides, padding, groups, need_dx)
  return dx if need_dx else None, dw


onednn_conv2d.defvjp(_onednn_fwd, _onednn_bwd, symbolic_zeros=True)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None, *,
                         native=False):
  """`lax.conv_general_dilated`, routed on CPU to `onednn_conv2d` (with `native`, where
  oneDNN takes the convolution) or `conv2d`."""
  dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  plain = (jax.default_backend() == 'cpu' and lhs.ndim == 4
           and dims == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMS)
           and batch_group_count == 1
           and all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
           and precision is None and preferred_element_type is None)
  if plain:
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    strides, padding = tuple(window_strides), tuple(tuple(p) for p in padding)
    if (native and onednn.supports(lhs, rhs, strides, padding, feature_group_count)
        and onednn.available()):
      return onednn_conv2d(lhs, rhs, strides, padding, feature_group_count)
    if feature_group_count == 1:
      return conv2d(lhs, rhs, strides, padding)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
