"""`lm compile --decode`: the batched engine's decode step (lm/infer/steps.py) compiled for
v5e topologies (4 chips, and 1) through libtpu on this CPU, the report checked against the pool's
arithmetic (pages x page_size x 2 x KV x Dh x dtype bytes x layers), with the pool's kv
heads split by tensor parallelism or replicated, layers looped or scanned; bad sizes give
one line and exit 2."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, sets

from lm.chips import TPUS

PAGES, PAGE_SIZE, SLOTS = 64, 8, 4


@pytest.mark.parametrize("topology,mesh,scan,pool_ways", [
    pytest.param("v5e:2x2", ["mesh.data=2", "mesh.tensor=2"], "false", 2, id="tensor2"),
    pytest.param("v5e:2x2", ["mesh.data=4"], "true", 1, id="data4-scanned"),
    pytest.param("v5e:1x1", [], "true", 1, id="one-chip"),  # a host of its own size
])
def test_decode_report(tmp_path, lm_here, topology, mesh, scan, pool_ways):
    out = tmp_path / "decode.json"
    r = lm_here("compile", "--decode", "--topology", topology, "--slots", str(SLOTS),
                "--pages", str(PAGES), "--page-size", str(PAGE_SIZE), "--json", str(out),
                *sets(*TINY, *mesh, "model.compute_dtype=bfloat16",
                      f"model.scan_layers={scan}"))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    layers, kv, dh = 2, 2, 16  # TINY: 2 layers, 2 heads of 32 / 2, no GQA
    pool = PAGES * PAGE_SIZE * 2 * kv * dh * 2 * layers  # bf16
    assert rep["pool_bytes"] == pool and rep["pool_tokens"] == PAGES * PAGE_SIZE
    assert rep["pool_chip_bytes"] == pool // pool_ways
    assert rep["slots"] == SLOTS and rep["table_width"] == 64 // PAGE_SIZE  # max_seq_len 64
    assert rep["hbm_bytes"] == TPUS["v5e"].hbm_bytes and rep["fits"]
    # The arguments hold the params and the pool; the donated pool is the output.
    assert rep["argument_bytes"] >= rep["params_chip_bytes"] + rep["pool_chip_bytes"]
    assert rep["alias_bytes"] >= rep["pool_chip_bytes"]
    assert 0 < rep["peak_bytes"] < rep["hbm_bytes"]
    assert rep["paged_kernel"] is False  # head_dim 16: the TPU kernel wants 128 (XLA gather)
    text = r.stdout
    for words in (f"decode step on {topology}", f"{SLOTS} slots x 1 token",
                  f"page pool: {PAGES} pages x {PAGE_SIZE} tokens = {PAGES * PAGE_SIZE:,} token slots",
                  "per chip: arguments", "temporaries", "of 16.00 GiB HBM per chip: fits",
                  "attention: the XLA gather"):
        assert words in text, text


@pytest.mark.parametrize("sinks,kernel", [(0, True), (2, False)], ids=["kernel", "sinks"])
def test_decode_uses_the_tpu_paged_kernel_where_it_applies(tmp_path, lm_here, sinks, kernel):
    """head_dim 128 (the kernel's) on v5e: the decode step's attention is the ragged
    paged attention Pallas kernel, per tensor shard; with sink tokens (which it lacks)
    the XLA gather."""
    out = tmp_path / "decode.json"
    r = lm_here("compile", "--decode", "--topology", "v5e:2x2", "--slots", "8",
                "--pages", "64", "--page-size", "16", "--json", str(out),
                *sets(*TINY, "model.d_model=256", "model.compute_dtype=bfloat16",
                      "mesh.data=2", "mesh.tensor=2", "model.attention.window=32",
                      f"model.attention.sinks={sinks}"))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["paged_kernel"] is kernel
    assert ("the Pallas paged-attention kernel" in r.stdout) is kernel, r.stdout


@pytest.mark.parametrize("flags,message", [
    (["--pages", "1"], "--pages must be 0 (auto) or >= 2"),
    (["--slots", "0"], "--slots must be >= 1"),
    (["--page-size", "0"], "--page-size must be >= 1"),
    (["--trials", "2"], "takes neither --suggest nor --trials"),
])
def test_bad_sizes_are_one_line(lm_here, flags, message):
    r = lm_here("compile", "--decode", "--topology", "v5e:2x2", *flags, *sets(*TINY))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
