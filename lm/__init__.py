"""lmlab: a JAX / Flax NNX research framework for language models.

The checkout's top-level folder kernels/ is the subpackage `lm.kernels`: a top-level
`kernels` would be Hugging Face's package of that name (both would install
site-packages/kernels/). A wheel installs the folder as lm/kernels/ (pyproject.toml,
package-dir); from a source tree (a checkout on PYTHONPATH, an editable install) the
finder below maps `lm.kernels` to the kernels/ beside this lm/, so a code tree always
runs its own kernels (benchmarks/cpu_throughput.py --tree)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


class _KernelsBesideLm:
    """Finds `lm.kernels` in the source tree's kernels/ folder."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "lm.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, _KERNELS / "__init__.py", submodule_search_locations=[str(_KERNELS)])


if not (Path(__file__).parent / "kernels").is_dir() and (_KERNELS / "__init__.py").is_file():
    sys.meta_path.insert(0, _KernelsBesideLm())
