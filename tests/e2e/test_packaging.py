"""The package as users install it: every third-party import is a declared dependency (or
one of a feature's extra), and the wheel, installed into a fresh virtualenv, trains and
benchmarks from a directory outside the checkout (default config, sizes and corpus come
from the package)."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, TINY, sets

FOLDERS = ("lm", "kernels")  # the checkout's code, installed as `lm` (kernels/: lm.kernels)


def _declared() -> set[str]:
    """The dependencies, and those of the feature extras (e.g. `wandb`: imported only
    where its feature is on); the test extra's are for the tests, never for lm/."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [d for name, deps in project.get("optional-dependencies", {}).items()
              if name != "test" for d in deps]
    return {_normal(re.match(r"[A-Za-z0-9_.-]+", d).group())
            for d in [*project["dependencies"], *extras]}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules() -> dict[str, str]:
    """{top-level module: a file importing it} over lm/ and kernels/ (absolute imports)."""
    found = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.partition(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_a_declared_dependency():
    by_module = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = []
    for module, where in sorted(_imported_top_level_modules().items()):
        if module in sys.stdlib_module_names or module in ("lm", "__future__"):
            continue
        dists = {_normal(d) for d in by_module.get(module, [])}
        assert dists, f"{module} (imported by {where}) is not installed"
        if not dists & declared:
            missing.append(f"{module} ({'/'.join(sorted(dists))}, imported by {where})")
    assert not missing, "not in pyproject's dependencies: " + ", ".join(missing)


def test_every_folder_is_a_listed_package_and_kernels_is_imported_as_lm_kernels():
    """pyproject lists the packages (kernels/ installs as lm.kernels, so packages.find
    cannot): a folder left out would be missing from the wheel. A top-level `kernels`
    import would be Hugging Face's package of that name wherever that is installed."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"lm.kernels": "kernels"}
    folders = {".".join(("lm",) + p.relative_to(ROOT).parts)
               if p.is_relative_to(ROOT / "kernels") else ".".join(p.relative_to(ROOT).parts)
               for f in FOLDERS for p in [ROOT / f, *(ROOT / f).rglob("*")]
               if p.is_dir() and p.name != "__pycache__"}
    assert sorted(setuptools["packages"]) == sorted(folders)
    assert "kernels" not in _imported_top_level_modules()
    import lm.kernels.dispatch
    assert Path(lm.kernels.dispatch.__file__).resolve() == ROOT / "kernels" / "dispatch.py"


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the checkout (so the build writes nothing into it)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    dist = tmp_path / "dist"
    # Without build isolation where setuptools is at hand (no download); else pip gets it.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation,
                    "-w", str(dist), str(src)], check=True, timeout=600)
    [wheel] = dist.glob("lmlab-*.whl")
    return wheel


def _top_level_kernels_wheel(tmp_path: Path) -> Path:
    """A wheel of a distribution `kernels` whose import package is a top-level `kernels`."""
    src = tmp_path / "kernels-dist"
    (src / "kernels").mkdir(parents=True)
    (src / "kernels" / "__init__.py").write_text('WHO = "not-lmlab"\n')
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "kernels"\nversion = "0.0.1"\n')
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation,
                    "-w", str(tmp_path / "dist-kernels"), str(src)], check=True, timeout=600)
    [wheel] = (tmp_path / "dist-kernels").glob("kernels-*.whl")
    return wheel


# Run by the fresh venv's interpreter: every requirement of the installed wheel (extras
# and markers aside) is a distribution it sees, at the pinned version.
REQUIREMENTS_MET = """
import importlib.metadata as md, re, sys
bad = []
for req in md.requires("lmlab") or []:
    if ";" in req:
        continue
    name, pin = re.match(r"([A-Za-z0-9_.-]+)(?:\\[[^]]*\\])?\\s*(?:==\\s*(\\S+))?", req).groups()
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or (pin and have != pin):
        bad.append(f"{req}: {have}")
print(bad)
sys.exit(1 if bad else 0)
"""


@pytest.mark.slow
def test_wheel_installs_and_runs_lm_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("lm/configs/default.py", "lm/configs/sizes.py", "lm/train/__init__.py",
                   "lm/train/loop.py", "lm/data/corpora/shakespeare.jsonl.xz",
                   "lm/kernels/attention/flash.py", "lm/kernels/scan/chunked.py",
                   "lm/evals/tasks/shakespeare_next_line.yaml",
                   "lm/evals/tasks/shakespeare_next_line.test.jsonl"):
        assert needed in names, f"{needed} is not in {wheel.name}"

    venv = tmp_path / "venv"
    # The fresh venv's processes see nothing of this one's environment (PYTHONPATH: a
    # checkout there would count as lmlab installed).
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=env)
    python = venv / "bin" / "python"
    # The wheel itself, not editable. Its dependencies come from this test environment
    # (a path entry after the venv's own site-packages: no download, no second copy of
    # JAX); that they are exactly the wheel's pinned requirements is checked below.
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
                   check=True, timeout=600, env=env)
    [site] = [p for p in (venv / "lib").glob("python3.*/site-packages")]
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "test_environment.pth").write_text("\n".join(deps) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = subprocess.run([str(python), "-c", REQUIREMENTS_MET], capture_output=True,
                           text=True, cwd=elsewhere, env=env, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    # Beside a top-level `kernels` (Hugging Face's package of that name on PyPI; here a
    # stand-in distribution writing site-packages/kernels/, as it does): both install,
    # nothing of either is overwritten, and each import finds its own.
    other = _top_level_kernels_wheel(tmp_path)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(other)],
                   check=True, timeout=600, env=env)
    where = subprocess.run([str(python), "-c", "import lm, lm.kernels.dispatch, kernels; "
                            "print(lm.__file__, lm.kernels.dispatch.__file__, kernels.__file__, "
                            "kernels.WHO)"],
                           capture_output=True, text=True, cwd=elsewhere, env=env, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    lm_init, dispatch, other_init, who = where.stdout.split()
    assert Path(lm_init) == site / "lm" / "__init__.py", where.stdout
    assert Path(dispatch) == site / "lm" / "kernels" / "dispatch.py", where.stdout
    assert (Path(other_init), who) == (site / "kernels" / "__init__.py", "not-lmlab"), where.stdout

    lm = str(venv / "bin" / "lm")
    tiny = sets(*TINY, "steps=2", "eval_every=2", "checkpoint_every=2")
    result = subprocess.run([lm, "train", *tiny], capture_output=True, text=True,
                            cwd=elsewhere, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (elsewhere / "runs" / "shakespeare-char" / "summary.json").is_file()
    result = subprocess.run([lm, "bench", *sets(*TINY), "--steps", "2"], capture_output=True,
                            text=True, cwd=elsewhere, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
