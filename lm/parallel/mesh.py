"""Building the device mesh from a MeshConfig.

Mesh axes, outermost to innermost: data, fsdp, expert, sequence, tensor. Tensor
parallelism talks most (every layer), so it gets the innermost, best-connected devices;
expert parallelism's all-to-alls (twice per MoE layer) sit between it and FSDP; data
parallelism talks least (once per step), so it spans slices over DCN on multislice pods.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from lm.config import ConfigError, MeshConfig
from lm.parallel.sharding import MESH_AXES as AXES


def axis_sizes(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Within-slice x across-slice sizes per axis, with one -1 filled from the count."""
    ici = {a: getattr(cfg, a) for a in AXES}
    dcn = {a: getattr(cfg, f"dcn_{a}") for a in AXES}
    for a in AXES:
        if dcn[a] < 1:
            raise ConfigError(f"mesh.dcn_{a} must be >= 1, got {dcn[a]}")
        if ici[a] == 0 or ici[a] < -1:
            raise ConfigError(f"mesh.{a} must be positive or -1 (fill), got {ici[a]}")
    fill = [a for a in AXES if ici[a] == -1]
    if len(fill) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {', '.join('mesh.' + a for a in fill)}")
    known = math.prod(ici[a] for a in AXES if ici[a] != -1) * math.prod(dcn.values())
    if fill:
        if n_devices % known:
            raise ConfigError(f"mesh: {n_devices} devices do not divide by the fixed axes' "
                              f"product {known} (mesh.{fill[0]}=-1 cannot be filled)")
        ici[fill[0]] = n_devices // known
    total = math.prod(ici.values()) * math.prod(dcn.values())
    if total != n_devices:
        shape = " x ".join(f"{a}={ici[a] * dcn[a]}" for a in AXES)
        raise ConfigError(f"mesh {shape} needs {total} devices but {n_devices} are present")
    return {a: ici[a] * dcn[a] for a in AXES} | {f"ici_{a}": ici[a] for a in AXES} | {
        f"dcn_{a}": dcn[a] for a in AXES}


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = axis_sizes(cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    dcn = tuple(sizes[f"dcn_{a}"] for a in AXES)
    if math.prod(dcn) > 1:
        from jax.experimental import mesh_utils
        ici = tuple(sizes[f"ici_{a}"] for a in AXES)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    elif devices[0].platform in ("tpu", "gpu", "cuda", "rocm"):
        from jax.experimental import mesh_utils
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except NotImplementedError:
            # A logical axis that is no product of whole torus axes (tensor=4 on a 16x16
            # v6e slice): split a physical axis; the tensor axis stays on neighbours.
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)
