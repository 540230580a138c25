"""`lm compile --decode`: one decode step of the batched engine compiled for a TPU topology
(no TPU needed), and what it holds per chip.

The step is the engine's own (lm/infer/steps.py `programs`: the one home of the decode
program): `slots` rows of one token each over a page pool of `pages` pages of
`page_size` tokens (`model.init_slot_cache`), a page table as wide as the engine's widest
(the model's max_seq_len in pages), and each row's sampling settings. Everything is
abstract (jax.ShapeDtypeStruct): parameters with the shardings a run of this config has
on the topology's mesh (lm/train/state.py), the K/V pools [pages, page_size, KV, Dh]
(a leading layer axis when the layers are scanned) with their kv heads on the mesh axes
of the "kv_heads" rule (tensor parallelism) and the rest replicated, as are the step's
other inputs and any per-slot recurrent state. The TPU compiler's memory_analysis() of
the compiled step gives, per chip: arguments (parameters + pool + the small inputs),
output (the donated pool aliases its input), temporaries and the peak.

The attention path is what the model's paged branch traces for a TPU target: today the
XLA gather of each row's pages (lm/model/mixers/attention.py); the report says whether
the Pallas paged kernel (kernels/attention/paged.py) is in the compiled HLO.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from lm.compile import (Topology, compile_or_refusal, format_bytes, memory_of, parse_topology,
                        peak_of, topology_devices)
from lm.config import ConfigError, TrainConfig
from lm.infer.steps import programs
from lm.kernels.attention.paged import KERNEL_NAME
from lm.kernels.dispatch import compiling_for
from lm.model.paged import PagedKV, PageStep
from lm.parallel.sharding import activation_sharding, per_device_bytes, replicated, spec_for


@dataclass
class DecodeReport:
    topology: str
    config: str
    mesh: dict
    params: int              # parameter count
    slots: int
    pages: int
    page_size: int
    table_width: int         # pages per sequence in the step's page table
    hbm_bytes: int
    param_dtype: str = "float32"
    fits: bool = True
    pool_bytes: int = 0      # the K/V pools, all chips together (no replication counted)
    pool_chip_bytes: int = 0  # per chip
    params_chip_bytes: int = 0
    state_chip_bytes: int = 0  # per-slot recurrent states (hybrid models), per chip
    argument_bytes: int = 0  # memory_analysis(), per chip
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    peak_bytes: int = 0
    paged_kernel: bool = False
    custom_calls: int = 0
    compile_s: float = 0.0
    error: str = ""

    @property
    def pool_tokens(self) -> int:
        return self.pages * self.page_size


def _paged(x) -> bool:
    return isinstance(x, PagedKV)


def _cache_shardings(cache, mesh, rules):
    """K/V pools: kv heads by the "kv_heads" rule (and layers by "layers" when scanned);
    per-slot states and everything else replicated."""
    def pool(x):
        names = ("layers",) * (x.ndim - 4) + (None, None, "kv_heads", "head_dim")
        return NamedSharding(mesh, spec_for(names, x.shape, mesh, rules))

    return jax.tree.map(
        lambda c: PagedKV(pool(c.kv)) if _paged(c) else jax.tree.map(
            lambda _: replicated(mesh), c), cache, is_leaf=_paged)


def decode_report(cfg: TrainConfig, topo: Topology, *, slots: int, pages: int,
                  page_size: int, devices=None) -> DecodeReport:
    """Compile the engine's decode step of cfg's model for the topology and measure it.
    `cfg` validated, its vocabulary filled (lm.train.setup.with_vocab)."""
    from lm.model import count_params
    from lm.parallel.mesh import make_mesh
    from lm.train.state import build

    devices = devices if devices is not None else topology_devices(topo)
    mesh = make_mesh(cfg.mesh, devices)
    pieces = build(cfg, mesh)
    m = cfg.model
    width = -(-m.max_seq_len // page_size)  # the engine's widest table: max_pages
    report = DecodeReport(topo.label(), cfg.name, {a: s for a, s in mesh.shape.items() if s > 1}
                          or {"data": 1}, count_params(m)["total"], slots, pages, page_size,
                          width, topo.chip.hbm_bytes, m.param_dtype)
    params = pieces.abstract_state()["params"]
    graphdef = pieces.graphdef
    cache = jax.eval_shape(
        lambda p: nnx.merge(graphdef, p).init_slot_cache(slots, pages, page_size), params)
    cache_sh = _cache_shardings(cache, mesh, pieces.rules)
    cache = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         cache, cache_sh)
    pools = [c for c in jax.tree.leaves(cache, is_leaf=_paged) if _paged(c)]
    report.pool_bytes = sum(c.kv.size * c.kv.dtype.itemsize for c in pools)
    report.pool_chip_bytes = per_device_bytes([c.kv for c in pools])
    report.params_chip_bytes = per_device_bytes(params)
    report.state_chip_bytes = per_device_bytes(cache) - report.pool_chip_bytes

    rep = replicated(mesh)

    def row(dtype, *shape):
        return jax.ShapeDtypeStruct((slots, *shape), dtype, sharding=rep)

    tokens, positions, active = row(jnp.int32), row(jnp.int32), row(jnp.bool_)
    # The step without Hydragen groups (G = 0): each row reads its pages through its table.
    step = PageStep(row(jnp.int32, 1), row(jnp.int32, width), row(jnp.int32),
                    row(jnp.int32, 1), jax.ShapeDtypeStruct((0, 0), jnp.int32, sharding=rep),
                    jax.ShapeDtypeStruct((0,), jnp.int32, sharding=rep))
    sampling = (row(jnp.int32), row(jnp.int32), row(jnp.int32), row(jnp.float32),
                row(jnp.int32), row(jnp.float32))
    _, decode = programs(graphdef, m.n_layers if m.scan_layers else None)
    platform = devices[0].platform
    def compile_decode():
        with activation_sharding(mesh, pieces.rules), compiling_for(platform), \
                jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            lowered = decode.trace(params, cache, tokens, positions, active, step,
                                   sampling).lower()
        return lowered.compile()

    compiled, report.compile_s, msg = compile_or_refusal(compile_decode)
    if compiled is None:
        report.fits, report.error = False, msg.splitlines()[0][:300]
        return report
    mem = memory_of(compiled)
    report.argument_bytes, report.output_bytes = mem["argument"], mem["output"]
    report.alias_bytes, report.temp_bytes, report.code_bytes = (mem["alias"], mem["temp"],
                                                                mem["code"])
    report.peak_bytes = peak_of(mem)
    report.fits = report.peak_bytes <= report.hbm_bytes
    text = compiled.as_text()
    report.paged_kernel = KERNEL_NAME in text
    report.custom_calls = text.count('custom_call_target="tpu_custom_call"')
    return report


def format_decode_report(r: DecodeReport) -> str:
    mesh = " x ".join(f"{a}={s}" for a, s in r.mesh.items())
    lines = [f"{r.config} ({r.params / 1e6:,.0f}M params) decode step on {r.topology}: mesh "
             f"{mesh}, {r.slots} slots x 1 token, page table {r.table_width} pages per "
             f"sequence, compiled in {r.compile_s:.1f}s",
             f"page pool: {r.pages} pages x {r.page_size} tokens = {r.pool_tokens:,} token "
             f"slots ({r.pool_tokens - r.page_size:,} usable: page 0 is the trash page), "
             f"{format_bytes(r.pool_bytes)} of K/V in all, {format_bytes(r.pool_chip_bytes)} "
             "per chip"]
    if r.error:
        lines.append(f"DOES NOT FIT: the TPU compiler refused it: {r.error}")
        return "\n".join(lines)
    state = (f" + per-slot states {format_bytes(r.state_chip_bytes)}"
             if r.state_chip_bytes else "")
    lines.append(f"per chip: arguments {format_bytes(r.argument_bytes)} (params "
                 f"{format_bytes(r.params_chip_bytes)} + pool {format_bytes(r.pool_chip_bytes)}"
                 f"{state} + step inputs), output {format_bytes(r.output_bytes)} "
                 f"({format_bytes(r.alias_bytes)} aliased to the donated cache), temporaries "
                 f"{format_bytes(r.temp_bytes)}")
    verdict = "fits" if r.fits else "DOES NOT FIT"
    lines.append(f"peak {format_bytes(r.peak_bytes)} of {format_bytes(r.hbm_bytes)} HBM per "
                 f"chip: {verdict} ({100 * r.peak_bytes / r.hbm_bytes:.0f}%)")
    lines.append("attention: " + ("the Pallas paged-attention kernel" if r.paged_kernel else
                                  "the XLA gather of each row's pages (no Pallas paged "
                                  "kernel in the HLO)")
                 + f"; {r.custom_calls} TPU custom calls")
    return "\n".join(lines)


def check_sizes(slots: int, pages: int, page_size: int) -> None:
    for flag, value, ok, want in (("--slots", slots, slots >= 1, ">= 1"),
                                  ("--pages", pages, pages == 0 or pages >= 2,
                                   "0 (auto) or >= 2: page 0 is the trash page"),
                                  ("--page-size", page_size, page_size >= 1, ">= 1")):
        if not ok:
            raise ConfigError(f"lm compile --decode: {flag} must be {want}, got {value}")


def run_decode_compile(cfg: TrainConfig, topology: str, *, slots: int, pages: int,
                       page_size: int, slices: int = 1, json_out: str = "") -> int:
    """`pages` 0: enough for `slots` sequences of the model's max_seq_len (+ the trash
    page), as lm generate sizes its pool."""
    from lm import config as config_lib
    from lm.data import load_tokenizer
    from lm.errors import EXIT_USER_ERROR
    from lm.train.setup import with_vocab
    check_sizes(slots, pages, page_size)
    topo = parse_topology(topology, slices)
    cfg = config_lib.validate(with_vocab(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size))
    pages = pages or slots * -(-cfg.model.max_seq_len // page_size) + 1
    report = decode_report(cfg, topo, slots=slots, pages=pages, page_size=page_size)
    print(format_decode_report(report))
    if json_out:
        import json
        from pathlib import Path
        Path(json_out).write_text(json.dumps(
            {**dataclasses.asdict(report), "pool_tokens": report.pool_tokens}, indent=1))
    if not report.fits:
        why = report.error or (f"peak {format_bytes(report.peak_bytes)} of "
                               f"{format_bytes(report.hbm_bytes)} HBM per chip")
        print(f"error: the decode step of {report.config} does not fit on {report.topology}: "
              f"{why} (try fewer --pages or --slots, more mesh.tensor"
              + (", model.param_dtype=bfloat16" if report.param_dtype == "float32" else "")
              + ")", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


__all__ = ["DecodeReport", "decode_report", "format_decode_report", "run_decode_compile",
           "check_sizes"]
