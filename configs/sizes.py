"""Named model sizes (`1m` ... `350m`): defined in the package, `lm/configs/sizes.py`, and
re-exported here so that configs in this folder (and yours) can `from sizes import sized`
(or, from anywhere, `from lm.configs.sizes import sized`)."""

from lm.configs.sizes import SIZES, sized

__all__ = ["SIZES", "sized"]
