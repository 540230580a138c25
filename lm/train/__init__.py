"""Training: train state, the jitted step, the loop, orbax checkpoints, metrics sinks, MFU."""
