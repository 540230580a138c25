"""The default run (`lm train` without --config): defined in the package,
`lm/configs/default.py`, so an installed `lm` has it too; re-exported here for the
configs in this folder (`from default import config`). To start your own config, copy
`lm/configs/default.py`."""

from lm.configs.default import config

__all__ = ["config"]
