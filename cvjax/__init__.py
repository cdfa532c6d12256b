"""cvjax: the classic CNNs of computer vision, reproducible in JAX/Flax."""

from cvjax import runtime

runtime.set_xla_flags()
runtime.quiet_jax_logs()
