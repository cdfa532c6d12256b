"""Tools beside the training loop: benchmarks, the zoo table, weight parity, sweep reports and
the GPU check's results. Nothing in a training run imports them."""
