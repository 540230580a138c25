"""Sharded training equals single-device training; layouts shrink per-device memory as
promised; tensor parallelism compiles to the expected collectives; a checkpoint
restores onto a different mesh. Runs with 8 simulated CPU devices in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import xla_flags

from lm.config import ConfigError, MeshConfig
from lm.parallel.mesh import axis_sizes
from lm.parallel.sharding import parse_rules

WORKER = Path(__file__).parent.parent / "parallel_worker.py"


def worker(task: str, args: dict) -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(WORKER), task, json.dumps(args)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


LAYOUTS = {
    "single": (1, {"data": 1}),
    "data=8": (8, {"data": 8}),
    "fsdp=8": (8, {"data": 1, "fsdp": 8}),
    "data=2,fsdp=2,tensor=2": (8, {"data": 2, "fsdp": 2, "tensor": 2}),
    "fsdp=2,sequence=4": (8, {"data": 1, "fsdp": 2, "sequence": 4}),
    "tensor=4,sequence=2": (8, {"data": 1, "tensor": 4, "sequence": 2}),
}


@pytest.fixture(scope="module")
def layouts():
    return worker("layouts", {"layouts": LAYOUTS})


@pytest.mark.slow
def test_every_layout_gives_the_single_device_losses(layouts):
    ref = np.array(layouts["single"]["losses"])
    assert ref[-1] < ref[0]
    for name, res in layouts.items():
        np.testing.assert_allclose(res["losses"], ref, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_per_device_parameter_bytes_shrink_as_the_layout_promises(layouts):
    full = layouts["single"]["param_bytes"]
    assert layouts["data=8"]["param_bytes"] == full  # replicated
    # Everything with an embed dim is split 8 ways; only the qk-norm scales
    # (2 layers x 2 x head_dim 16 x 4 bytes) have none and stay whole.
    assert layouts["fsdp=8"]["param_bytes"] == (full - 256) / 8 + 256
    assert layouts["fsdp=8"]["state_bytes"] < layouts["single"]["state_bytes"] / 7
    # tensor=4 splits heads and the MLP 4 ways; the 259-token vocabulary and the 2 KV
    # heads don't divide by 4, so the embedding and wk/wv stay whole (replicated).
    per_layer = (64 * 4 * 16 * 2 + 64 * 256 * 2) // 4 + 64 * 2 * 16 * 2 + 64 * 2 + 16 * 2
    expected = 4 * (259 * 64 + 2 * per_layer + 64)
    assert layouts["tensor=4,sequence=2"]["param_bytes"] == expected
    assert layouts["data=2,fsdp=2,tensor=2"]["param_bytes"] < full / 3


@pytest.mark.slow
def test_mqa_and_gqa_work_under_tensor_and_sequence_parallelism():
    layouts = {"single": (1, {"data": 1}), "tp_sp": (8, {"data": 1, "tensor": 4, "sequence": 2})}
    for kv in (1, 4):
        res = worker("layouts", {"layouts": layouts, "n_kv_heads": kv})
        np.testing.assert_allclose(res["tp_sp"]["losses"], res["single"]["losses"], rtol=1e-5)


@pytest.mark.slow
def test_tensor_parallel_layers_compile_to_one_all_reduce_each():
    # Megatron: a column-parallel in-projection needs no communication, the row-parallel
    # out-projection ends in one all-reduce; nothing is gathered.
    layers = worker("hlo_layer", {})
    for name in ("mlp", "attention"):
        assert layers[name] == {"all-reduce": 1, "all-gather": 0, "reduce-scatter": 0,
                                "all-to-all": 0}, (name, layers[name])


@pytest.mark.slow
def test_scanned_layers_shard_the_same_way():
    layouts = {k: LAYOUTS[k] for k in ("single", "data=2,fsdp=2,tensor=2", "fsdp=2,sequence=4")}
    res = worker("layouts", {"layouts": layouts, "scan_layers": True})
    for name in layouts:
        np.testing.assert_allclose(res[name]["losses"], res["single"]["losses"], rtol=1e-5,
                                   err_msg=name)


@pytest.mark.slow
def test_collectives_in_compiled_steps():
    fsdp = worker("hlo", {"mesh": {"data": 1, "fsdp": 4}, "devices": 4})
    assert fsdp["all-gather"] > 0  # parameters are gathered before use
    seq = worker("hlo", {"mesh": {"data": 1, "sequence": 4}, "devices": 4})
    assert seq["all-gather"] > 0  # keys/values gathered along the sequence


@pytest.mark.slow
def test_checkpoint_saved_under_fsdp_restores_under_data_tensor(tmp_path):
    res = worker("reshard", {"dir": str(tmp_path / "ckpt")})
    assert "tensor" in res["spec"]  # really resharded onto the new mesh
    np.testing.assert_allclose(res["resumed"], res["reference"], rtol=1e-5)


def test_mesh_errors_are_readable():
    assert axis_sizes(MeshConfig(data=-1, tensor=2), 8)["data"] == 4
    with pytest.raises(ConfigError, match="needs 6 devices but 8 are present"):
        axis_sizes(MeshConfig(data=3, tensor=2), 8)
    with pytest.raises(ConfigError, match="cannot be filled"):
        axis_sizes(MeshConfig(data=-1, tensor=3), 8)
    with pytest.raises(ConfigError, match="only one mesh axis may be -1"):
        axis_sizes(MeshConfig(data=-1, fsdp=-1), 8)
    assert axis_sizes(MeshConfig(data=2, fsdp=2, dcn_data=2), 8)["data"] == 4
    with pytest.raises(ConfigError, match="unknown mesh axis"):
        parse_rules("embed=model")
    assert parse_rules("embed=fsdp+tensor,vocab=")["vocab"] == ()
