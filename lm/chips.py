"""One table of accelerators: what `lm compile` estimates with (peak FLOP/s, HBM size and
bandwidth, interconnect) and what MFU is measured against in `lm train` / `lm bench`
(lm/train/mfu.py), with the `device_kind` strings JAX reports for each chip.

Figures are the vendors' published per-chip numbers (dense, no sparsity): Google Cloud
TPU system architecture pages (v4, v5e, v5p, v6e), NVIDIA data sheets (SXM parts).
`achieved_mfu`: model-FLOPs utilisation that tuned training runs of large dense models
are published to reach on the chip (MaxText's tables, cited per chip below); `lm compile`
calibrates its roofline bound with it (lm/compile.py), since a roofline knows nothing of
kernel efficiency and, for a compute-bound step, says 100%.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GiB = 2**30


@dataclass(frozen=True)
class Chip:
    name: str               # "v5p", "H100"
    device_kinds: tuple[str, ...]  # jax Device.device_kind strings it matches (prefixes)
    peak_bf16: float        # dense bf16 FLOP/s
    peak_fp32: float | None  # dense fp32 FLOP/s where published (TPUs: none; fp32
                             # matmuls run as several bf16 passes)
    hbm_bytes: int
    hbm_bw: float           # bytes/s
    ici_bw: float           # bytes/s per chip over the chip-to-chip links (ICI, NVLink),
                            # all links, one direction
    dcn_bw: float = 0.0     # bytes/s per chip across slices (host NIC shared by its chips)
    cores_in_name: int = 1  # TPU: TensorCores per chip counted by "vXp-N" names
    dims: int = 0           # TPU: torus dimensions of topology names (3: v4/v5p, 2: v5e/v6e)
    # Published achieved MFU of tuned large dense models on this chip, one slice:
    # (what, MFU) pairs; empty where none is published (see the sources per chip).
    achieved_mfu: tuple[tuple[str, float], ...] = ()
    # Dense int8 / fp8 matmul peaks (OP/s) where the chip has them (LOW_PRECISION below).
    peak_int8: float | None = None
    peak_fp8: float | None = None

    def peak(self, precision: str = "bf16") -> tuple[float, str]:
        """(peak OP/s of matmuls in `precision`, its name): int8 / fp8 where the chip
        publishes one, else the bf16 peak."""
        low = {"int8": self.peak_int8, "fp8": self.peak_fp8}.get(precision)
        return (low, precision) if low else (self.peak_bf16, "bf16")

    @property
    def peak_flops(self) -> float:
        return self.peak_bf16

    @property
    def generation(self) -> str:
        return self.name

    def achieved_range(self) -> tuple[float, float] | None:
        """(lowest, highest) published achieved MFU on this chip, or None."""
        if not self.achieved_mfu:
            return None
        values = [m for _, m in self.achieved_mfu]
        return min(values), max(values)


TPUS = {
    # MaxText, MaxText/configs/v4/README.md ("High Performance Model Configs on TPU v4").
    "v4": Chip("v4", ("TPU v4",), 275e12, None, 32 * GiB, 1.228e12, 300e9, 6.25e9, 2, 3,
               achieved_mfu=(("22B, v4-128", 0.567), ("52B, v4-384", 0.560))),
    # MaxText/configs/v5e/README.md, one v5e-256 slice.
    "v5e": Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, None, 16 * GiB, 0.819e12, 200e9,
                6.25e9, 1, 2,
                achieved_mfu=(("16B, v5e-256", 0.6110), ("32B, v5e-256", 0.6686),
                              ("64B, v5e-256", 0.5990), ("128B, v5e-256", 0.5606))),
    # MaxText/configs/v5p/README.md, one slice; docs/reference/models/tiering.md (Llama 2
    # 70B on 512 chips, 65.4%).
    "v5p": Chip("v5p", ("TPU v5p", "TPU v5"), 459e12, None, 95 * GiB, 2.765e12, 600e9,
                6.25e9, 2, 3,
                achieved_mfu=(("32B, v5p-128", 0.7147), ("64B, v5p-128", 0.7031),
                              ("128B, v5p-256", 0.6868), ("128B, v5p-512", 0.6883),
                              ("256B, v5p-1024", 0.6709), ("512B, v5p-1024", 0.6399),
                              ("1024B, v5p-2048", 0.5535), ("1024B, v5p-4096", 0.6480),
                              ("Llama 2 70B, 512 chips", 0.654))),
    # MaxText docs/reference/models/tiering.md, Trillium (v6e), 256 chips, dense models.
    "v6e": Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, None, 32 * GiB, 1.640e12, 448e9,
                12.5e9, 1, 2,
                achieved_mfu=(("Llama 2 70B", 0.438), ("Llama 3.1 8B", 0.4546),
                              ("Llama 3.1 70B", 0.5033))),
}

GPUS = {
    "H100": Chip("H100", ("NVIDIA H100",), 989e12, 67e12, 80 * 10**9, 3.35e12, 450e9),
    "H200": Chip("H200", ("NVIDIA H200",), 989e12, 67e12, 141 * 10**9, 4.8e12, 450e9),
    "A100": Chip("A100", ("NVIDIA A100",), 312e12, 19.5e12, 80 * 10**9, 2.039e12, 300e9),
    "L4": Chip("L4", ("NVIDIA L4",), 121e12, 30.3e12, 24 * 10**9, 0.3e12, 0.0),
    "B200": Chip("B200", ("NVIDIA B200",), 2250e12, None, 180 * 10**9, 8e12, 900e9),
    "GB200": Chip("GB200", ("NVIDIA GB200",), 2250e12, None, 186 * 10**9, 8e12, 900e9),
}

# Dense low-precision peaks (half the "with sparsity" figures where only those are
# printed). Google Cloud TPU docs (system architecture pages): v5e 394 int8 TOPS, v5p
# 918, Trillium (v6e) 1836; no fp8 matmul units on these. NVIDIA data sheets (SXM):
# H100 / H200 1979 TFLOPS fp8 and 1979 TOPS int8, A100 624 TOPS int8 (no fp8), L4 242.5
# fp8 / int8, B200 4.5 PFLOPS fp8 / 4.5 POPS int8. v4: none published beyond bf16.
LOW_PRECISION = {"v5e": (394e12, None), "v5p": (918e12, None), "v6e": (1836e12, None),
                 "H100": (1979e12, 1979e12), "H200": (1979e12, 1979e12),
                 "A100": (624e12, None), "L4": (242.5e12, 242.5e12),
                 "B200": (4.5e15, 4.5e15)}
for _name, (_int8, _fp8) in LOW_PRECISION.items():
    _table = TPUS if _name in TPUS else GPUS
    _table[_name] = replace(_table[_name], peak_int8=_int8, peak_fp8=_fp8)

CHIPS = {**TPUS, **GPUS}


def for_device_kind(kind: str) -> Chip | None:
    """The chip whose device_kind strings match `kind` (the longest match wins: "TPU v5
    lite" is a v5e, "TPU v5" a v5p), or None."""
    best, best_len = None, -1
    for chip in CHIPS.values():
        for k in chip.device_kinds:
            if (kind.startswith(k) or k in kind) and len(k) > best_len:
                best, best_len = chip, len(k)
    return best


def cpu_model() -> str:
    """This host's CPU model name (/proc/cpuinfo), for tagging CPU measurements."""
    import platform
    from pathlib import Path
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
