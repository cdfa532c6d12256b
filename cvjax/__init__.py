"""cvjax: the classic CNNs of computer vision, reproducible in JAX/Flax.

Importing cvjax sets nothing process-wide: the commands call cvjax.runtime.configure()."""
