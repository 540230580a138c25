"""Model-FLOPs utilisation (MFU): `mfu()` (the one formula) and the device peak FLOP/s.

Accelerators: the published dense bf16 peak of the chip (lm/chips.py, the one table of
chips, which `lm compile` reads too). CPU: there is no published figure for a shared VM,
so the f32 matmul throughput of this machine is measured once and cached
(~/.cache/lmlab/cpu_peak.json, keyed by CPU, core count and XLA_FLAGS; a re-measurement
keeps the best figure seen, since a busy machine only measures low).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from lm.chips import cpu_model, for_device_kind

CACHE = Path(os.environ.get("LMLAB_CACHE", Path.home() / ".cache" / "lmlab"))


def _cpu_key() -> str:
    # XLA_FLAGS change the figure (the test suite compiles at -O0): a measurement under
    # other flags is another entry, never the peak of a plain run.
    flags = os.environ.get("XLA_FLAGS", "").strip()
    return f"{cpu_model()}|{os.cpu_count()}|jax{jax.__version__}" + (f"|{flags}" if flags else "")


def measure_cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-N f32 matmul throughput of the default (CPU) backend."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def cpu_peak_flops(refresh: bool = False) -> float:
    path = CACHE / "cpu_peak.json"
    key = _cpu_key()
    table = {}
    if path.exists():
        try:
            table = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            table = {}
    if key in table and not refresh:
        return float(table[key])
    # A shared machine only ever measures below its peak: keep the best figure seen.
    peak = max(measure_cpu_matmul_flops(), float(table.get(key, 0.0)))
    table[key] = peak
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1))
    except OSError:
        pass  # an unwritable cache only costs a re-measurement next time
    return peak


def device_peak_flops(device=None, measure: bool = False,
                      precision: str = "bf16") -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from). On CPU the f32 matmul
    throughput of this machine: measured now with `measure`, else the cached figure.
    `precision`: the dtype a quantized-training run's matmuls run in ("int8", "fp8":
    lm/compress/quantize.py matmul_precision): the chip's peak in it where lm/chips.py
    has one, else its bf16 peak (the source says which)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return (cpu_peak_flops(refresh=measure),
                "f32 matmul measured in this run" if measure else "measured f32 matmul (cached)")
    kind = device.device_kind
    chip = for_device_kind(kind)
    if chip is not None:
        peak, used = chip.peak(precision)
        return peak, f"{chip.name} {used} table (lm/chips.py)"
    return float("nan"), f"unknown device kind {kind!r}"


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float,
        n_devices: int) -> float:
    """Model-FLOPs utilisation: the model FLOP/s achieved over the peak of all devices."""
    return flops_per_token * tokens_per_s / (peak_flops * n_devices)
