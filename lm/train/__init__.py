"""Training: run setup (once), train state, the jitted step, the asynchronous loop, orbax
checkpoints, metrics sinks, MFU."""
