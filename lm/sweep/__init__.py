"""Sweeps: a Python spec (`experiments/*.py`) expands into named trials, each run as its
own `lm train` subprocess in `<workdir>/<trial>` (see `spec` and `runner`)."""

from lm.sweep.spec import (
    Grid,
    LogUniform,
    Sweep,
    Trial,
    Zip,
    expand,
    load_spec,
    log_grid,
)

__all__ = ["Grid", "LogUniform", "Sweep", "Trial", "Zip", "expand", "load_spec", "log_grid"]
