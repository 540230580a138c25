"""The Pallas kernels lower for CUDA through Triton, checked on CPU: the step is lowered
(not compiled) for an abstract NVIDIA H100, so no GPU is needed. What this cannot check,
and a real GPU must: that Triton compiles the kernels (tile shapes, shared memory), that
they run and match the references (tests/test_kernels_*.py with interpret=False), and
their speed (benchmarks/kernel_bench.py)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import triton as pallas_triton
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from lm.kernels.attention.flash import flash_attention
from lm.kernels.dispatch import GPU_COMPILER_PARAMS
from lm.kernels.scan.chunked import linear_scan

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

H100 = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,),
                    abstract_device=AbstractDevice(device_kind="NVIDIA H100", num_cores=None,
                                                   platform="cuda"))


def cuda_hlo(fn, *shapes) -> str:
    with use_abstract_mesh(H100):
        return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def triton_calls(hlo: str) -> list[str]:
    """The lines of the Triton custom calls in a lowered module (one op a line)."""
    target = f"custom_call @{pallas_triton.CUSTOM_CALL_TARGET_NAME}("
    return [line for line in hlo.splitlines() if target in line]


def spec(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def check(hlo: str, n_kernels: int):
    calls = triton_calls(hlo)
    assert len(calls) == n_kernels, hlo[:2000]
    for line in calls:  # the compiler params of kernels/dispatch.py
        assert re.search(rf"num_warps = {GPU_COMPILER_PARAMS.num_warps} : i32", line)
    assert "mosaic_gpu" not in hlo  # JAX 0.10 lowered through Mosaic GPU by default


def test_flash_attention_lowers_to_triton_forward_and_backward():
    q, kv, seg = spec(2, 96, 4, 64), spec(2, 96, 2, 64), spec(2, 96, dtype=jnp.int32)

    def fwd(q, k, v, s):
        return flash_attention(q, k, v, segment_ids=s, window=16, sinks=2, interpret=False)

    def loss(q, k, v, s):
        return fwd(q, k, v, s).astype(jnp.float32).sum()

    check(cuda_hlo(fwd, q, kv, kv, seg), 1)
    check(cuda_hlo(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, seg), 3)  # fwd, dq, dk/dv


def test_linear_scan_lowers_to_triton_forward_and_backward():
    qk, v, decay = spec(1, 80, 1, 16, dtype=jnp.float32), spec(1, 80, 2, 16, dtype=jnp.float32), \
        spec(1, 80, 2, dtype=jnp.float32)
    seg = spec(1, 80, dtype=jnp.int32)

    def fwd(q, k, v, a, s):
        return linear_scan(q, k, v, a, segment_ids=s, chunk_size=32, impl="pallas",
                           interpret=False)[0]

    def loss(q, k, v, a, s):
        return fwd(q, k, v, a, s).sum()

    check(cuda_hlo(fwd, qk, qk, v, decay, seg), 1)
    hlo = cuda_hlo(jax.grad(loss, argnums=(0, 1, 2, 3)), qk, qk, v, decay, seg)
    assert len(triton_calls(hlo)) >= 2  # the backward reuses the forward kernel
    check(hlo, len(triton_calls(hlo)))


def test_hybrid_train_step_lowers_for_cuda_with_both_kernels():
    # The whole train step of an attention + Mamba-2 model, kernels chosen for a GPU: the
    # flash kernel (forward, dq, dk/dv) and the scan kernel (forward and its reuse in the
    # backward) in one CUDA module.
    from conftest import TINY

    from lm.config import resolve
    from lm.train.state import build

    cfg = resolve("configs/default.py", TINY + [
        "model.vocab_size=259", "model.mixer_pattern=am", "model.attention.impl=pallas",
        "model.mamba2.scan_impl=pallas", "model.d_model=64", "model.n_heads=4"])
    pieces = build(cfg)
    pieces.target_platform = "gpu"
    with use_abstract_mesh(H100):  # Triton's lowering asks it for the GPU model
        hlo = pieces.train_step().trace(pieces.abstract_state(), pieces.abstract_batch()
                                        ).lower(lowering_platforms=("cuda",)).as_text()
    assert len(triton_calls(hlo)) >= 3 + 2, hlo[:2000]
    assert "mosaic_gpu" not in hlo and "tpu_custom_call" not in hlo
