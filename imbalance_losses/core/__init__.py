"""The shared core: the lifecycle, validation, pooling, gradients and records every method uses."""
