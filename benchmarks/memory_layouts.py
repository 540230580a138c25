"""Per-device memory of a ~110M-parameter model under each mesh layout, on 8 simulated
CPU devices: parameter + optimizer bytes from the shardings, and XLA's estimate for the
compiled train step. Nothing is run, only compiled.

    python benchmarks/memory_layouts.py [--seq 1024] [--batch 16]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from lm.config import DataConfig, MeshConfig, ModelConfig, TrainConfig  # noqa: E402
from lm.model import count_params  # noqa: E402
from lm.parallel.mesh import make_mesh  # noqa: E402
from lm.parallel.sharding import per_device_bytes  # noqa: E402
from lm.train.state import build  # noqa: E402

LAYOUTS = {
    "1 device": (1, {"data": 1}),
    "data=8": (8, {"data": 8}),
    "fsdp=8": (8, {"data": 1, "fsdp": 8}),
    "data=2,fsdp=2,tensor=2": (8, {"data": 2, "fsdp": 2, "tensor": 2}),
    "fsdp=2,sequence=4": (8, {"data": 1, "fsdp": 2, "sequence": 4}),
    "tensor=4,sequence=2": (8, {"data": 1, "tensor": 4, "sequence": 2}),
    "tensor=8": (8, {"data": 1, "tensor": 8}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    model = ModelConfig(vocab_size=32768, d_model=768, n_layers=12, n_heads=12,
                        max_seq_len=args.seq, scan_layers=True, tie_embeddings=True)
    counts = count_params(model)
    print(f"model: {counts['total'] / 1e6:.1f}M params, batch {args.batch} x seq {args.seq}, "
          "f32 params + AdamW state")
    mib = 2**20
    print("| layout | params MiB/device | params+optimizer MiB/device | step temporaries MiB/device |")
    print("|---|---:|---:|---:|")
    for name, (n, mesh) in LAYOUTS.items():
        cfg = TrainConfig(model=model, data=DataConfig(seq_len=args.seq), mesh=MeshConfig(**mesh),
                          batch_size=args.batch)
        pieces = build(cfg, make_mesh(cfg.mesh, jax.devices()[:n]))
        state = pieces.abstract_state()
        _, memory = pieces.compile_train_step()
        print(f"| {name} | {per_device_bytes(state['params']) / mib:,.0f} | "
              f"{per_device_bytes(state) / mib:,.0f} | {memory['temp'] / mib:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
