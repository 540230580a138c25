"""The configs that ship inside the package, so that an installed `lm` (not only a
checkout) has a default run: `default.py` (what `lm train` / `lm bench` run without
--config) and `sizes.py` (the named model sizes, `from lm.configs.sizes import sized`).

The checkout's top-level `configs/` holds the user-facing examples; its `default.py`
and `sizes.py` import these, so each is defined once."""

from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "default.py"
