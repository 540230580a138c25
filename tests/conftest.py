"""Shared helpers: run the real `lm` CLI in a subprocess (or in this process, for the
paths that fail before any work), a tiny fast config, and the test-wide XLA settings."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Tests run on CPU (also where a TPU/GPU plugin is installed: no backend probing).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TPU compiles (libtpu topologies, no TPU touched) from several xdist workers at once: the
# libtpu lockfile would let only one process load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The suite compiles hundreds of tiny programs and runs each a few times, so compile time
# is most of its time. Two XLA:CPU settings, for this process and, through the
# environment, every process it starts (subprocesses that set XLA_FLAGS get them too, see
# `lm` and `xla_flags`); numerics are unchanged up to float reassociation, and the real
# program is what runs (benchmarks/ and `lm` itself never see these flags):
# - jaxlib 0.12 turns small while loops, e.g. the threefry loops of parameter init, into
#   kernels whose LLVM compile takes 0.8-2.6 s each: without the pass the tiny model's
#   init compiles in 2.2 s instead of 4.5 s (8 simulated devices: 1.8 s instead of 7.4 s);
# - LLVM at -O0: the heaviest in-process tests take 35% less CPU time.
TEST_XLA_FLAGS = ("--xla_disable_hlo_passes=small-while-loop-hoisting "
                  "--xla_backend_optimization_level=0")
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), TEST_XLA_FLAGS]))

# One persistent compilation cache for the session, shared with every subprocess (set
# before JAX is imported): the suite's dozens of `lm` processes compile the same tiny
# init / train / eval programs, and a cache hit turns the ~6.8 s of compiling them in
# each into ~0.7 s. Programs that compile in under 0.2 s are not worth the disk write. A cache
# directory chosen by the caller (JAX_COMPILATION_CACHE_DIR) is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="lmlab-test-jax-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def xla_flags(*flags: str) -> str:
    """This process's XLA_FLAGS (TEST_XLA_FLAGS included) plus `flags`: the value for a
    subprocess that needs its own, e.g. simulated devices."""
    return " ".join([os.environ["XLA_FLAGS"], *flags])

# A model small enough that a few training steps take a second or two on CPU.
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
    "data.seq_len=32", "batch_size=4", "steps=12", "log_every=2", "eval_every=6",
    "eval_batches=2", "checkpoint_every=4", "optim.warmup_steps=2",
]


def lm(*args: str, env: dict | None = None, cwd: Path | None = None,
       timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    if env and "XLA_FLAGS" in env:
        full_env["XLA_FLAGS"] = xla_flags(env["XLA_FLAGS"])
    full_env.setdefault("JAX_PLATFORMS", "cpu")
    return subprocess.run([sys.executable, "-m", "lm.cli", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd or ROOT, timeout=timeout)


@pytest.fixture
def lm_here(capfd, monkeypatch):
    """`lm ARGS` in this process: lm.cli.main(list) (which does not re-execute itself),
    from the repository root like `lm`, with what it wrote to file descriptors 1 and 2.
    For paths that exit before any work (usage, config and data errors, dry runs), where
    a subprocess adds only seconds of start-up; one subprocess test per kind of error
    keeps the real command covered."""
    from lm.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        monkeypatch.chdir(ROOT)
        capfd.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse usage errors
            code = e.code if isinstance(e.code, int) else 1
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["lm", *args], code, out, err)
    return run


def simulated_devices_result(script: str, devices: int = 4, timeout: int = 600):
    """Run `script` in a fresh Python with `devices` simulated CPU devices (XLA_FLAGS must
    be set before JAX starts) and return the JSON it printed on its last `RESULT ` line."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def sets(*overrides: str) -> list[str]:
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


def assert_train_refused(lm_here, run: Path, overrides: list[str], message: str) -> None:
    """`lm train` with TINY + overrides exits 2 with one line containing `message` and
    writes nothing."""
    result = lm_here("train", "--run-dir", str(run), *sets(*TINY, *overrides))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not run.exists()


def overfit_losses(model, tx, tokens_BT, steps: int) -> list[float]:
    """Next-token loss of `model` trained by optax `tx` on one batch, per step (the
    overfit check of a model or an optimizer)."""
    import jax
    import optax
    from flax import nnx
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)

    def loss_fn(p):
        logits, _ = nnx.merge(graphdef, p)(tokens_BT[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BT[:, 1:]).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state, losses = tx.init(params), []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return losses


def train_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            losses[rec["step"]] = rec["loss"]
    return losses


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One completed tiny run shared by tests that only read it."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    result = lm("train", "--run-dir", str(run), *sets(*TINY))
    assert result.returncode == 0, result.stderr[-2000:]
    return run
