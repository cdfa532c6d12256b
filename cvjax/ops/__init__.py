"""Kernels beneath the models: the convolution a model is built with, and the oneDNN library
that runs it on CPU."""
