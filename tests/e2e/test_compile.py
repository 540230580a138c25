"""`lm compile`: topology names, the HLO collective count (with loop trip counts), and
the real command compiling a small model for v5p:2x2x1 through libtpu on this CPU,
checked field by field; a mesh that does not match the topology and a model that
cannot fit give one line and exit 2."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from conftest import TINY, sets

from lm.compile import CHIPS, collectives_of, parse_topology
from lm.config import ConfigError


@pytest.mark.parametrize("text,name,chips", [
    ("v5p-8", "v5p:2x2x1", 4),        # accelerator types count TensorCores on v4 / v5p
    ("v5p-64", "v5p:2x4x4", 32),
    ("v5p:4x4x4", "v5p:4x4x4", 64),
    ("v6e-256", "v6e:16x16", 256),    # ... and chips on v5e / v6e
    ("v5litepod-16", "v5e:4x4", 16),
    ("v4-16", "v4:2x2x2", 8),
])
def test_topology_names(text, name, chips):
    topo = parse_topology(text)
    assert (topo.name, topo.chips) == (name, chips)
    assert parse_topology(text, slices=2).chips == 2 * chips


@pytest.mark.parametrize("text,message", [
    ("v7x-8", "expected e.g. v5p-64"),
    ("v5p-6", "no standard v5p slice of 3 chips"),
    ("v5p:2x2", "v5p topologies have 3 dimensions"),
    ("v6e-7", "no standard v6e slice of 7 chips"),
])
def test_bad_topology_is_one_line(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_topology(text)


HLO = """HloModule jit_step

%cond (p: (s32[], f32[1024])) -> pred[] {
  %p = (s32[], f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %p = (s32[], f32[1024]{0}) parameter(0)
  %x = f32[1024]{0} get-tuple-element(%p), index=1
  %ar = f32[1024]{0} all-reduce(%x), replica_groups={{0,1,2,3}}, to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[1024]{0}) tuple(%i, %ar)
}

ENTRY %main (a: bf16[8,128]) -> f32[1024] {
  %a = bf16[8,128]{1,0} parameter(0)
  %ag = bf16[32,128]{1,0} all-gather(%a), replica_groups=[2,4]<=[8], dimensions={0}
  %init = (s32[], f32[1024]{0}) tuple(%z, %v)
  %w = (s32[], f32[1024]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[1024]{0} get-tuple-element(%w), index=1
}
"""


def test_collectives_are_weighted_by_loop_trip_counts():
    c = collectives_of(HLO, n_devices=8, mesh_sizes={"data": 8})
    ar, ag = c["all-reduce"], c["all-gather"]
    assert ar.count == 3 and ar.bytes == 3 * 4096  # inside a 3-trip while loop
    assert ar.moved == pytest.approx(3 * 2 * 4096 * 3 / 4)  # ring all-reduce over 4
    assert ag.count == 1 and ag.bytes == 32 * 128 * 2
    assert ag.moved == pytest.approx(32 * 128 * 2 * 3 / 4)  # groups of 4 (iota form)
    assert c["reduce-scatter"].count == c["all-to-all"].count == 0


def test_collectives_after_a_kernel_with_multiline_attributes_are_counted():
    # A Pallas TPU kernel's custom call carries its metadata over several lines, one of
    # which starts with "}}": that is not the end of the computation.
    kernel = ('  %k = f32[8]{0} custom-call(%a), custom_call_target="tpu_custom_call", '
              'frontend_attributes={kernel_metadata={\n"xprof_metadata":"{}"\n}}, '
              'metadata={op_name="splash"}\n')
    text = HLO.replace("  %ag = ", kernel + "  %ag = ")
    assert '\n}}, metadata' in text
    c = collectives_of(text, n_devices=8, mesh_sizes={"data": 8})
    assert c["all-gather"].count == 1 and c["all-reduce"].count == 3


def test_compile_v5p_report_field_by_field(tmp_path, lm_here):
    out = tmp_path / "report.json"
    r = lm_here("compile", "--topology", "v5p:2x2x1", "--json", str(out),
                *sets(*TINY, "mesh.fsdp=4", "batch_size=8", "model.attention.impl=xla"))
    assert r.returncode == 0, r.err if hasattr(r, "err") else r.stderr
    (rep,) = json.loads(out.read_text())
    from lm.config import resolve
    from lm.model import count_params, flops_per_token
    cfg = resolve("configs/default.py", TINY + ["mesh.fsdp=4", "batch_size=8",
                                                 "model.vocab_size=259"])
    n = count_params(cfg.model)["total"]
    assert rep["topology"] == "v5p:2x2x1" and rep["mesh"] == {"fsdp": 4}
    assert rep["params"] == n and rep["fits"] and rep["hbm_bytes"] == CHIPS["v5p"].hbm_bytes
    # f32 parameters: every one sharded 4 ways along embed (d_model=32 divides) or not
    # at all (norm scales), so per chip between n/4 and n parameters' worth of bytes.
    assert 4 * n / 4 <= rep["params_bytes"] < 4 * n
    assert rep["opt_bytes"] >= 2 * rep["params_bytes"]  # Adam's mu and nu
    assert rep["batch_bytes"] == 5 * 8 * 32 * 4 // 4  # 5 int32/f32 rows, split 4 ways
    assert 0 < rep["temp_bytes"] < rep["peak_bytes"] < rep["hbm_bytes"]
    # FSDP: parameters gathered for the layers, gradients reduce-scattered.
    assert rep["collectives"]["all-gather"]["count"] >= cfg.model.n_layers
    assert {"all-gather", "reduce-scatter"} <= set(rep["collectives"]) or (
        rep["collectives"]["all-reduce"]["count"] > 0)
    tokens = 8 * 32
    assert rep["model_flops"] == pytest.approx(flops_per_token(cfg.model, 32) * tokens)
    assert rep["hw_flops_per_chip"] == pytest.approx(rep["model_flops"] / 4)
    terms = [rep[k] for k in ("t_compute", "t_hbm", "t_ici", "t_dcn")]
    assert rep["t_overlap"] == max(terms) and rep["t_serial"] >= rep["t_overlap"]
    assert 0 < rep["mfu_serial"] <= rep["mfu_overlap"] <= 1
    # The expected MFU: the perfect-overlap bound x v5p's published achieved range.
    low, high = CHIPS["v5p"].achieved_range()
    assert rep["mfu_low"] == pytest.approx(rep["mfu_overlap"] * low)
    assert rep["mfu_high"] == pytest.approx(rep["mfu_overlap"] * high) and high < 0.75
    assert rep["eval_peak_bytes"] and rep["eval_peak_bytes"] < rep["peak_bytes"]
    text = r.stdout
    for words in ("on v5p:2x2x1: mesh fsdp=4", "fits", "collectives per step",
                  "ESTIMATE (roofline, not a measurement)", "MFU bound", "expected: MFU "):
        assert words in text, text
    assert math.isfinite(rep["t_overlap"])


def _report(mfu_overlap: float, **kw):
    from lm.compile import Report
    low, high = CHIPS["v5p"].achieved_range()
    r = Report("v5p:2x2x1", "pod-350m", {"fsdp": 4}, "none", 350_000_000, True,
               CHIPS["v5p"].hbm_bytes, peak_bytes=20 * 2**30, t_compute=0.1,
               t_overlap=0.1 / mfu_overlap, t_serial=0.12 / mfu_overlap,
               mfu_overlap=mfu_overlap, mfu_serial=0.8 * mfu_overlap,
               mfu_low=mfu_overlap * low, mfu_high=mfu_overlap * high,
               mfu_basis=f"{100 * low:.0f}-{100 * high:.0f}% published for tuned large "
                         "dense models on v5p")
    return dataclasses.replace(r, **kw)


def test_suggest_never_prints_the_roofline_bound_as_the_estimate():
    # A compute-bound layout: the perfect-overlap roofline says 100% MFU. The table shows
    # the bound scaled by what MaxText publishes for v5p (55-71%), the step time at it,
    # and says what the bound is.
    from lm.compile import format_report, format_suggestions
    text = format_suggestions([_report(1.0), _report(0.5, remat="full")], 12)
    rows = [ln for ln in text.splitlines() if ln[:1].isdigit()]
    assert rows[0].split()[-1] == "55-71%" and rows[1].split()[-1] == "28-36%", text
    assert "100%" not in "\n".join(rows)
    assert "139.9..180.7 ms" in rows[0], rows[0]  # 100 ms of compute at 71% .. 55%
    assert "perfect-overlap bound (by rank: 100%, 50%" in text and "MaxText" in text
    report = format_report(_report(1.0))
    assert "MFU bound 80..100% (no overlap..perfect overlap)" in report
    assert "expected: MFU 55-71%, step 139.9..180.7 ms" in report


def test_one_table_of_chips():
    from lm.chips import CHIPS as ALL
    from lm.chips import for_device_kind
    assert all(CHIPS[g] is ALL[g] for g in CHIPS)  # lm compile's generations are the table's
    for kind, name in [("TPU v5 lite", "v5e"), ("TPU v5", "v5p"), ("TPU v5p", "v5p"),
                       ("TPU v4", "v4"), ("TPU v6 lite", "v6e"), ("NVIDIA H100 80GB HBM3", "H100"),
                       ("NVIDIA GB200", "GB200"), ("NVIDIA B200", "B200")]:
        assert for_device_kind(kind).name == name, kind
    assert for_device_kind("Some NPU") is None
    for chip in CHIPS.values():  # every TPU generation has published achieved MFU
        low, high = chip.achieved_range()
        assert 0.4 < low <= high < 0.75, chip.name


def test_mesh_that_does_not_match_the_topology_is_one_line(lm_here):
    r = lm_here("compile", "--topology", "v5p:2x2x1", *sets(*TINY, "mesh.fsdp=8"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "4 devices do not divide by the fixed axes' product 8" in lines[0], r.stderr


def test_model_that_cannot_fit_exits_2_with_one_line(lm_here):
    # 4.1B parameters of embedding with Adam on 4 v5e chips (16 GiB each): the TPU
    # compiler itself refuses it, quickly (one layer).
    r = lm_here("compile", "--topology", "v5e:2x2",
                *sets(*TINY, "mesh.fsdp=4", "model.n_layers=1", "model.d_model=1024",
                      "model.n_heads=8", "model.vocab_size=4000000", "model.attention.impl=xla"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit on v5e:2x2" in lines[0], r.stderr
    assert "DOES NOT FIT" in r.stdout and "['params']['embed']" in r.stdout


@pytest.mark.slow
def test_multislice_gradient_sync_crosses_dcn(tmp_path, lm_here):
    out = tmp_path / "r.json"
    r = lm_here("compile", "--topology", "v5p:2x2x1", "--slices", "2", "--train-only",
                "--json", str(out), *sets(*TINY, "mesh.fsdp=4", "mesh.dcn_data=2",
                                          "batch_size=8", "model.attention.impl=xla"))
    assert r.returncode == 0, r.stderr
    (rep,) = json.loads(out.read_text())
    assert rep["topology"] == "v5p:2x2x1 x 2 slices" and rep["mesh"] == {"data": 2, "fsdp": 4}
    dcn = sum(c["dcn_moved"] for c in rep["collectives"].values())
    ici = sum(c["moved"] - c["dcn_moved"] for c in rep["collectives"].values())
    assert dcn > 0 and ici > 0 and rep["t_dcn"] > 0  # data parallelism over DCN, FSDP inside


@pytest.mark.slow
def test_suggest_ranks_compiled_layouts(lm_here):
    r = lm_here("compile", "--topology", "v5p:2x2x1", "--suggest", "--max-compiles", "2",
                *sets(*TINY, "batch_size=8", "model.attention.impl=xla"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("rank"))
    rows = lines[head + 1:head + 3]
    assert [row.split()[0] for row in rows] == ["1", "2"]
    assert all(" yes " in row for row in rows)  # a tiny model fits any layout
    assert "compiled 2 of" in lines[head - 1]
    assert lines[-1].startswith("best: lm compile --topology v5p:2x2x1 --set mesh.data=")


def test_libtpu_is_quiet_on_a_host_without_tpus():
    # `lm` tells an installed libtpu there is no pod here before JAX starts; without it,
    # JAX's backend probe makes libtpu print a dozen lines of warnings on every command.
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
                        "TPU_SKIP_MDS_QUERY")}
    code = ("from lm.compile import quiet_libtpu; quiet_libtpu(); import jax; "
            "print(jax.devices()[0].platform)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "cpu", r.stderr
    assert "TPU_WORKER_HOSTNAMES" not in r.stderr and "libtpu" not in r.stderr, r.stderr
