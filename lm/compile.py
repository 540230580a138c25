"""`lm compile`: the run's real train step compiled for a TPU topology, on any machine.

libtpu's topology descriptors give TPU devices that XLA's TPU compiler compiles for on a
CPU-only host, so before queueing for a pod a user sees, per chip: the state, batch,
temporaries and peak bytes against the chip's HBM (and the compiler's own message when
it does not fit), the collectives in the compiled step, the step's FLOPs, and a roofline
estimate of the step time and MFU. `--suggest` enumerates meshes and remat policies,
compiles the most promising and ranks them.

What is measured and what is estimated:
  * bytes: the TPU compiler's memory_analysis() of the compiled step (exact for that
    program; the runtime adds little beyond it);
  * collectives: parsed from the compiled HLO, each weighted by the trip count of the
    loops around it (scanned layers, gradient accumulation);
  * FLOPs: the model's analytic count (6N + attention + scan mixers, lm.model), times
    4/3 under full remat (the forward runs twice); XLA's cost_analysis() is shown beside
    it but counts a loop body once;
  * time: an ESTIMATE from a roofline over the chip's published peak bf16 FLOP/s, HBM
    and interconnect bandwidths (lm/chips.py), bracketed by perfect overlap (the largest
    term) and none (compute or HBM, plus the collectives). HBM traffic comes from
    cost_analysis(), which counts a loop body once: under scanned layers the HBM term is
    a LOWER bound (scaling it by the FLOPs it missed was tried and overshot). A
    compute-bound step therefore reaches 100% MFU with perfect overlap: the roofline
    knows nothing of kernel efficiency, so that is a bound, never a forecast;
  * expected MFU: the perfect-overlap bound times the range of MFU that tuned training
    of large dense models is published to reach on the chip (MaxText's tables, lm/chips.py
    `achieved_mfu`: e.g. 55-71% on v5p). That is what `--suggest` ranks and prints. It
    is calibrated on 8B-1T models; smaller ones (narrow matmuls, relatively more
    non-matmul work) usually reach less, and no published figure says how much.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from dataclasses import dataclass

from lm.chips import TPUS, Chip
from lm.config import ConfigError, TrainConfig
from lm.parallel.sharding import MESH_AXES

GiB = 2**30


# The TPU generations a topology can name: the one table of chips (lm/chips.py).
CHIPS = TPUS
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}


@dataclass(frozen=True)
class Topology:
    chip: Chip
    name: str       # libtpu's topology name, e.g. "v5p:2x2x1"
    shape: tuple[int, ...]
    slices: int

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.slices

    def label(self) -> str:
        return self.name + (f" x {self.slices} slices" if self.slices > 1 else "")


# The slice shapes Cloud TPU offers per chip count (libtpu topology names).
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}


def _slice_shape(chips: int, chip: Chip) -> tuple[int, ...]:
    table = SHAPES_3D if chip.dims == 3 else SHAPES_2D
    if chips not in table:
        raise ConfigError(f"--topology: no standard {chip.generation} slice of {chips} chips "
                          f"(known: {', '.join(map(str, table))}); give the shape, e.g. "
                          f"{chip.generation}:{'x'.join(map(str, next(iter(table.values()))))}")
    return table[chips]


def parse_topology(text: str, slices: int = 1) -> Topology:
    """'v5p-64' (accelerator type: TensorCores for v4/v5p, chips for v5e/v6e),
    'v5p:4x4x4' or 'v6e:16x16' (libtpu topology names)."""
    if slices < 1:
        raise ConfigError(f"--slices must be >= 1, got {slices}")
    m = re.fullmatch(r"(v\d+[a-z]*)(?:[-:](.+))", text.strip().lower())
    gen = m and ALIASES.get(m.group(1), m.group(1))
    if not m or gen not in CHIPS:
        raise ConfigError(f"--topology {text!r}: expected e.g. v5p-64, v5p:4x4x4, v6e-256 "
                          f"or v5e:2x2 (generations: {', '.join(CHIPS)})")
    chip, rest = CHIPS[gen], m.group(2)
    if "x" in rest:
        try:
            shape = tuple(int(x) for x in rest.split("x"))
        except ValueError:
            raise ConfigError(f"--topology {text!r}: bad shape {rest!r}") from None
        if len(shape) != chip.dims or min(shape) < 1:
            raise ConfigError(f"--topology {text!r}: {gen} topologies have {chip.dims} "
                              f"dimensions, e.g. {gen}:{'x'.join(['2'] * chip.dims)}")
    else:
        if not rest.isdigit() or int(rest) % chip.cores_in_name:
            raise ConfigError(f"--topology {text!r}: expected {gen}-N with N a multiple of "
                              f"{chip.cores_in_name}")
        shape = _slice_shape(int(rest) // chip.cores_in_name, chip)
    return Topology(chip, f"{gen}:{'x'.join(map(str, shape))}", shape, slices)


# libtpu on a host without TPUs looks for the TPU VM's environment and, missing it,
# prints a dozen lines of warnings. These values describe "no pod here" to it; the
# compile target comes from the topology name alone (device kinds follow it: checked).
HOST_LIBTPU_ENV = {"TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost",
                   "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def quiet_libtpu(environ=None) -> None:
    """On a host without TPU chips (no /dev/accel*, no /dev/vfio), tell an installed libtpu
    that there is no pod here, before JAX starts: it then stays silent and JAX picks the
    CPU (or GPU) as it would without libtpu. A TPU VM's environment is left alone."""
    import glob
    import os
    environ = os.environ if environ is None else environ
    if not (glob.glob("/dev/accel*") or os.path.exists("/dev/vfio")):
        _describe_no_pod(environ)


def _describe_no_pod(environ) -> None:
    for key, value in HOST_LIBTPU_ENV.items():
        environ.setdefault(key, value)


def topology_devices(topo: Topology):
    """TPU devices of the topology (libtpu; no TPU needed, JAX_PLATFORMS=cpu is enough)."""
    import os

    from jax.experimental import topologies
    if os.environ.get("JAX_PLATFORMS") == "cpu":  # no TPU of ours to describe wrongly
        _describe_no_pod(os.environ)
    # A host of a slice drives up to 2x2x1 chips; a slice smaller than that (v5e:1x1,
    # one chip) is one host of its own size (libtpu refuses bounds that do not divide it).
    shape = (*topo.shape, 1, 1)[:3]
    bounds = tuple(min(b, s) for b, s in zip((2, 2, 1), shape))
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo.name, chip_config_name="default",
            chips_per_host_bounds=bounds, num_slices=topo.slices)
    except Exception as e:  # noqa: BLE001 (libtpu missing or the name unknown to it)
        raise ConfigError(f"--topology {topo.name}: libtpu cannot describe it "
                          f"({str(e).splitlines()[0][:200]}); install lmlab[tpu]") from None
    devices = list(desc.devices)
    if len(devices) != topo.chips:
        raise ConfigError(f"--topology {topo.label()}: libtpu describes {len(devices)} "
                          f"devices, expected {topo.chips} chips")
    return devices


# ------------------------------------------------------------------- HLO collectives

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_COMP_HEAD = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def _shape_bytes(type_text: str) -> int:
    """Bytes of an HLO type, e.g. 'bf16[8,128]{1,0}' or a tuple of such."""
    total = 0
    for dtype, dims in _SHAPE.findall(type_text):
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _groups(attrs: str, n_devices: int, mesh_sizes: dict[str, int],
            dcn_axes: frozenset = frozenset()) -> tuple[int, list[list[int]] | None, bool | None]:
    """(devices per replica group, the groups as device ids where XLA prints them, whether
    a group crosses slices when that follows from the mesh axes named). Forms:
    {{0,1,2,3},...}, [G,S]<=[dims]T(perm) (iota), mesh['a'=2,'b'=4] {'b'}, source-target
    pairs (collective-permute), or none (all devices)."""
    m = re.search(r"replica_groups=\{(\{[\d,]+\}(?:,\{[\d,]+\})*)\}", attrs)
    if m:
        groups = [[int(x) for x in g.split(",")] for g in re.findall(r"\{([\d,]+)\}", m.group(1))]
        return len(groups[0]), groups, None
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        import numpy as np
        dims = [int(x) for x in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(x) for x in m.group(4).split(",")])
        groups = ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
        return int(m.group(2)), groups, None
    m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attrs)
    if m:
        sizes = dict((k.strip().strip("'"), int(v)) for k, v in
                     (kv.split("=") for kv in m.group(1).split(",")))
        axes = [a.strip().strip("'") for a in m.group(2).split(",") if a.strip()]
        known = all(a in mesh_sizes for a in axes)
        return math.prod(sizes[a] for a in axes), None, (bool(set(axes) & dcn_axes) if known
                                                          else None)
    m = re.search(r"source_target_pairs=\{([^}]*)\}", attrs)
    if m:
        pairs = [[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)\}", m.group(0))]
        return 2, pairs or None, None
    return n_devices, [list(range(n_devices))], None


def _algorithm_bytes(kind: str, size: int, n: int) -> float:
    """Bytes each device sends in a bandwidth-optimal (ring) algorithm over n devices:
    all-gather / reduce-scatter move (n-1)/n of the full buffer, all-reduce twice that."""
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2 * size * (n - 1) / n
    if kind in ("all-gather", "reduce-scatter", "all-to-all"):
        return size * (n - 1) / n
    return float(size)  # collective-permute: the buffer once


@dataclass
class Collective:
    kind: str
    count: int = 0          # executions per step (loop trip counts applied)
    bytes: float = 0.0      # full-buffer bytes summed over executions
    moved: float = 0.0      # per-device bytes sent (ring algorithm), summed
    dcn_moved: float = 0.0  # the part of `moved` that crosses slices


def parse_hlo(text: str) -> tuple[dict[str, list], str | None]:
    """Computations of an HLO module: name -> list of (name, type, opcode, rest)."""
    comps: dict[str, list] = {}
    entry, current = None, None
    for line in text.splitlines():
        head = _COMP_HEAD.match(line)
        if head:
            current = head.group(2)
            comps[current] = []
            if head.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.rstrip() == "}":  # not "}}, metadata=...": the continuation line of an
            current = None        # instruction whose attributes span lines (Pallas kernels)
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append(m.groups())
    return comps, entry


def _trip_count(cond: list) -> int:
    """A while loop's trip count from its condition `i < constant` (counter from 0)."""
    constants = {}
    for name, typ, op, rest in cond:
        if op == "constant" and typ.startswith("s32[]"):
            c = re.match(r"(-?\d+)\)", rest)
            if c:
                constants[name] = int(c.group(1))
    for name, typ, op, rest in cond:
        if op == "compare" and "direction=LT" in rest:
            for ref in re.findall(r"%([\w.\-]+)", rest.split(")")[0]):
                if ref in constants:
                    return constants[ref]
    return 1  # unknown: count the body once (and say so nowhere worse than cost_analysis)


def collectives_of(text: str, n_devices: int, mesh_sizes: dict[str, int],
                   slice_of: dict[int, int] | None = None,
                   dcn_axes: frozenset = frozenset()) -> dict[str, Collective]:
    """Collectives in a compiled module, each weighted by the loops around it. `slice_of`:
    device id -> slice; `dcn_axes`: mesh axes that span slices."""
    comps, entry = parse_hlo(text)
    out = {k: Collective(k) for k in COLLECTIVES}
    multislice = slice_of is not None and len(set(slice_of.values())) > 1
    per_slice = n_devices // max(1, len(set(slice_of.values()))) if multislice else n_devices

    def visit(comp: str, mult: int, depth: int = 0) -> None:
        if depth > 64 or comp not in comps:
            return
        for name, typ, op, rest in comps[comp]:
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base in COLLECTIVES:
                if base == "reduce-scatter" or "all-reduce-scatter" in comp:
                    kind = "reduce-scatter" if "all-reduce-scatter" in comp else base
                else:
                    kind = base
                size = _shape_bytes(typ)
                if op.endswith("-start") and base == "all-gather":
                    size = _shape_bytes(typ.split("), ")[-1]) or size  # (operand, result)
                n, groups, crosses = _groups(rest, n_devices, mesh_sizes, dcn_axes)
                c = out[kind]
                c.count += mult
                c.bytes += mult * size
                moved = mult * _algorithm_bytes(kind, size, n)
                c.moved += moved
                if multislice:
                    if crosses is None and groups is not None:
                        crosses = any(len({slice_of.get(d, 0) for d in g}) > 1 for g in groups)
                    if crosses is None:  # axes XLA named itself: by the group's size
                        crosses = n > per_slice
                    if crosses:
                        c.dcn_moved += moved
            if op == "send" and "_xla_megascale_transfer_type" in rest:
                # Multislice: cross-slice (DCN) collectives leave the per-slice program
                # as host sends to the MegaScale runtime, tagged with the collective.
                kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', rest).group(1)
                kind = kind.lower().replace("_", "-")
                if kind in out:
                    size = _shape_bytes(typ.split("]")[0] + "]")  # the payload, not the token
                    slices = len(set(slice_of.values())) if slice_of else 1
                    moved = mult * _algorithm_bytes(kind, size, slices)
                    c = out[kind]
                    c.count += mult
                    c.bytes += mult * size
                    c.moved += moved
                    c.dcn_moved += moved
                continue
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest)
                cond = re.search(r"condition=%?([\w.\-]+)", rest)
                trips = _trip_count(comps.get(cond.group(1), [])) if cond else 1
                if body:
                    visit(body.group(1), mult * trips, depth + 1)
                continue
            for callee in re.findall(r"(?:calls|body|to_apply|true_computation|"
                                     r"false_computation)=%?([\w.\-]+)", rest):
                visit(callee, mult, depth + 1)
            branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
            if branches:
                for callee in re.findall(r"%?([\w.\-]+)", branches.group(1)):
                    visit(callee, mult, depth + 1)

    if entry:
        visit(entry, 1)
    return out


# ------------------------------------------------------------------- the report

@dataclass
class Report:
    topology: str
    config: str
    mesh: dict
    remat: str
    params: int
    fits: bool
    hbm_bytes: int
    state_bytes: int = 0
    params_bytes: int = 0
    opt_bytes: int = 0
    batch_bytes: int = 0
    temp_bytes: int = 0
    peak_bytes: int = 0
    eval_peak_bytes: int | None = None
    collectives: dict = dataclasses.field(default_factory=dict)
    model_flops: float = 0.0      # per step, all chips
    hw_flops_per_chip: float = 0.0
    xla_flops_per_chip: float = 0.0
    hbm_traffic: float = 0.0
    t_compute: float = 0.0
    t_hbm: float = 0.0
    t_ici: float = 0.0
    t_dcn: float = 0.0
    t_overlap: float = 0.0
    t_serial: float = 0.0
    mfu_overlap: float = 0.0      # the roofline's bounds (perfect overlap, none)
    mfu_serial: float = 0.0
    mfu_low: float = 0.0          # expected: mfu_overlap x the chip's published achieved
    mfu_high: float = 0.0         # MFU range (lm/chips.py); 0 where none is published
    mfu_basis: str = ""
    custom_calls: int = 0
    low_precision_dots: dict = dataclasses.field(default_factory=dict)  # dtype -> count
    compile_s: float = 0.0
    error: str = ""
    largest: list = dataclasses.field(default_factory=list)


def compile_or_refusal(compile_fn):
    """(compiled, seconds, None), or (None, seconds, the compiler's message) where the
    compiler refuses for memory: that is a verdict ("does not fit"). Any other error (a
    lowering error that mentions a memory space is a bug to show) propagates."""
    t0 = time.perf_counter()
    try:
        compiled = compile_fn()
    except Exception as e:  # noqa: BLE001 (the TPU compiler refuses what cannot fit)
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "ran out of memory" not in msg.lower():
            raise
        return None, time.perf_counter() - t0, msg
    return compiled, time.perf_counter() - t0, None


LOW_PRECISION_TYPES = {"i8": "int8", "f8E4M3FN": "fp8_e4m3", "f8E5M2": "fp8_e5m2"}


def low_precision_dots(stablehlo: str) -> dict[str, int]:
    """{dtype: count} of the dot_generals in a lowered step (StableHLO text: operand types
    are spelled out there, not in the compiled HLO) whose first operand is int8 or fp8:
    quantized training's matmuls (lm/compress/quantize.py)."""
    out: dict[str, int] = {}
    for m in re.finditer(r"stablehlo\.dot_general .*: \(tensor<[0-9x]*x?(\w+)>", stablehlo):
        name = LOW_PRECISION_TYPES.get(m.group(1))
        if name:
            out[name] = out.get(name, 0) + 1
    return out


def memory_of(compiled) -> dict:
    m = compiled.memory_analysis()
    get = lambda k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)  # noqa: E731
    return {"argument": get("argument"), "output": get("output"), "alias": get("alias"),
            "temp": get("temp"), "code": get("generated_code")}


def peak_of(mem: dict) -> int:
    """Live bytes at the step's peak: inputs, the outputs not aliased to (donated)
    inputs, temporaries and the program itself."""
    return mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["code"]


def _oom_lines(message: str) -> list[str]:
    """The compiler's own account of what did not fit (its largest allocations)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    keep = [ln for ln in lines if re.search(r"(?i)size|shape|allocation|exceed|hbm|memory", ln)]
    return keep[:12]


def _largest_state(abstract_state, k: int = 5) -> list[str]:
    import jax
    from lm.parallel.sharding import per_device_bytes
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    sized = sorted(((per_device_bytes(x), jax.tree_util.keystr(p)) for p, x in leaves), reverse=True)
    return [f"{b / GiB:.2f} GiB {name}" for b, name in sized[:k]]


def compile_report(cfg: TrainConfig, topo: Topology, devices=None, eval_step: bool = True,
                   trials: int = 1) -> Report:
    """Compile cfg's train step (and eval step) for the topology and measure it.
    `trials` > 1: the step of that many batched trials of cfg (seeds cfg.seed + i) as
    one program (lm/train/trials.py), the trial axis on the mesh's "trials" rule."""
    from lm.model import count_params, flops_per_token
    from lm.parallel.sharding import per_device_bytes
    from lm.train.setup import setup_run

    devices = devices if devices is not None else topology_devices(topo)
    from lm.parallel.mesh import make_mesh
    mesh = make_mesh(cfg.mesh, devices)  # the one-line errors of lm train for bad meshes
    run = setup_run(cfg, mesh)
    cfg, pieces = run.cfg, run.pieces
    chip, n = topo.chip, topo.chips
    state = pieces.abstract_state()
    batch = pieces.abstract_batch()
    t_args = ()
    from lm.post.reference import attach_frozen
    attach_frozen(run)  # a distilling run's teacher / a DPO run's reference: an argument too
    if pieces.teacher is not None:
        t_args = (pieces.teacher.abstract_params(),)
    train_step = lambda: pieces.train_step().trace(state, batch, *t_args)  # noqa: E731
    if trials > 1:
        from lm.train.trials import make_group
        group = make_group([dataclasses.replace(cfg, seed=cfg.seed + i, name=f"{cfg.name}.{i}")
                            for i in range(trials)], mesh=mesh)
        state, batch = group.abstract_state(), group.abstract_batch()
        train_step = lambda: group.step_fn().trace(  # noqa: E731
            state, group.abstract_values(), batch, *t_args)
        eval_step = False
    name = cfg.name if trials == 1 else (
        f"{cfg.name} x {trials} batched trials (trial axis on "
        f"{'+'.join(group.axes) or 'no mesh axis'})")
    report = Report(topo.label(), name, {a: s for a, s in mesh.shape.items() if s > 1} or
                    {"data": 1}, cfg.model.remat, count_params(cfg.model)["total"], True,
                    chip.hbm_bytes)
    one = state["trials"] if trials > 1 else state
    report.params_bytes = per_device_bytes(one["params"])
    report.opt_bytes = per_device_bytes(one["opt_state"])
    report.state_bytes = per_device_bytes(state)
    report.batch_bytes = per_device_bytes(batch)
    lowered = train_step().lower()  # its StableHLO names the matmuls' operand types
    compiled, report.compile_s, msg = compile_or_refusal(lowered.compile)
    if compiled is None:
        report.fits, report.error = False, msg.splitlines()[0][:300]
        need = re.search(r"required for HLO temporaries \(([\d.]+)G\)", msg)
        if need:  # what it would take: the compiler's temporaries on top of the inputs
            report.temp_bytes = int(float(need.group(1)) * GiB)
            report.peak_bytes = report.state_bytes + report.batch_bytes + report.temp_bytes
        report.largest = _oom_lines("\n".join(msg.splitlines()[1:])) + _largest_state(state)
        return report
    mem = memory_of(compiled)
    report.temp_bytes, report.peak_bytes = mem["temp"], peak_of(mem)
    report.fits = report.peak_bytes <= chip.hbm_bytes
    if not report.fits:
        report.largest = _largest_state(state)
    text = compiled.as_text()
    report.custom_calls = text.count("custom_call_target=\"tpu_custom_call\"")
    report.low_precision_dots = low_precision_dots(lowered.as_text())
    slice_of = {d.id: getattr(d, "slice_index", 0) for d in devices}
    dcn_axes = frozenset(a for a in MESH_AXES
                         if getattr(cfg.mesh, f"dcn_{a}") > 1)
    colls = collectives_of(text, n, dict(mesh.shape), slice_of, dcn_axes)
    report.collectives = {k: dataclasses.asdict(c) for k, c in colls.items() if c.count}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else (cost or {})
    report.xla_flops_per_chip = float(cost.get("flops", 0.0))
    report.hbm_traffic = float(cost.get("bytes accessed", 0.0))

    tokens = cfg.batch_size * cfg.data.seq_len
    report.model_flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens * trials
    recompute = {"none": 1.0, "full": 4 / 3}.get(cfg.model.remat, 1.15)  # dots: ~matmuls kept
    report.hw_flops_per_chip = report.model_flops * recompute / n
    from lm.compress.quantize import matmul_precision
    # Quantized training's matmuls at the chip's int8 / fp8 peak where it has one.
    peak, _ = chip.peak(matmul_precision(cfg.quant))
    report.t_compute = report.hw_flops_per_chip / peak
    report.t_hbm = report.hbm_traffic / chip.hbm_bw
    ici = sum(c.moved - c.dcn_moved for c in colls.values())
    dcn = sum(c.dcn_moved for c in colls.values())
    report.t_ici, report.t_dcn = ici / chip.ici_bw, dcn / chip.dcn_bw
    terms = (report.t_compute, report.t_hbm, report.t_ici, report.t_dcn)
    report.t_overlap, report.t_serial = max(terms), max(terms[:2]) + sum(terms[2:])
    ideal = report.model_flops / (n * peak)
    report.mfu_overlap = ideal / report.t_overlap if report.t_overlap else 0.0
    report.mfu_serial = ideal / report.t_serial if report.t_serial else 0.0
    achieved = chip.achieved_range()
    if achieved:
        report.mfu_low, report.mfu_high = (report.mfu_overlap * a for a in achieved)
        report.mfu_basis = (f"{100 * achieved[0]:.0f}-{100 * achieved[1]:.0f}% published for "
                            f"tuned large dense models on {chip.name}")
    if eval_step:
        e = pieces.eval_step().trace(state["params"], pieces.abstract_batch()).lower().compile()
        report.eval_peak_bytes = peak_of(memory_of(e))
    return report


def format_bytes(b: float) -> str:
    """Bytes in the largest unit that keeps them >= 1 (GiB, MiB, KiB)."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def _ms(t: float) -> str:
    return f"{1e3 * t:.1f} ms" if t >= 1e-3 else f"{1e6 * t:.0f} us"


def _pct_range(r: Report) -> str:
    return f"{100 * r.mfu_low:.0f}-{100 * r.mfu_high:.0f}%"


def _step_range(r: Report) -> str:
    """The step time at the expected MFU (low MFU: the longer step)."""
    ideal = r.mfu_overlap * r.t_overlap  # model FLOPs / (chips x peak)
    fast, slow = _ms(ideal / r.mfu_high), _ms(ideal / r.mfu_low)
    if fast.split()[1] == slow.split()[1]:
        fast = fast.split()[0]
    return f"{fast}..{slow}"


def format_report(r: Report) -> str:
    mesh = " x ".join(f"{a}={s}" for a, s in r.mesh.items())
    lines = [f"{r.config} ({r.params / 1e6:,.0f}M params) on {r.topology}: mesh {mesh}, "
             f"remat {r.remat}, compiled in {r.compile_s:.1f}s"]
    if r.error:
        lines.append(f"DOES NOT FIT: the TPU compiler refused it: {r.error}")
        lines += [f"  {ln}" for ln in r.largest]
        return "\n".join(lines)
    verdict = "fits" if r.fits else "DOES NOT FIT"
    lines.append(f"per chip: params {format_bytes(r.params_bytes)} + optimizer {format_bytes(r.opt_bytes)}, "
                 f"batch {format_bytes(r.batch_bytes)}, temporaries {format_bytes(r.temp_bytes)}; peak "
                 f"{format_bytes(r.peak_bytes)} of {format_bytes(r.hbm_bytes)} HBM: {verdict} "
                 f"({100 * r.peak_bytes / r.hbm_bytes:.0f}%)"
                 + (f"; eval step peak {format_bytes(r.eval_peak_bytes)}" if r.eval_peak_bytes else ""))
    if not r.fits:
        lines.append("  largest state buffers per chip: " + "; ".join(r.largest))
    if r.collectives:
        lines.append("collectives per step (loop trip counts applied; bytes: full buffers / "
                     "sent per chip):")
        for kind, c in r.collectives.items():
            dcn = f", {format_bytes(c['dcn_moved'])} over DCN" if c["dcn_moved"] else ""
            lines.append(f"  {kind:<19} x{c['count']:<5} {format_bytes(c['bytes'])} / {format_bytes(c['moved'])}{dcn}")
    else:
        lines.append("collectives per step: none")
    lines.append(f"FLOPs per step: model {r.model_flops:.3e} (analytic, all chips), "
                 f"{r.hw_flops_per_chip:.3e} per chip with remat recompute; XLA cost_analysis "
                 f"{r.xla_flops_per_chip:.3e} per chip (counts a loop body once)")
    hbm_note = " (a lower bound: loop bodies counted once)" if r.xla_flops_per_chip < \
        0.9 * r.hw_flops_per_chip else ""
    lines.append(f"ESTIMATE (roofline, not a measurement): compute {_ms(r.t_compute)}, "
                 f"HBM {_ms(r.t_hbm)}{hbm_note}, ICI {_ms(r.t_ici)}, DCN {_ms(r.t_dcn)}"
                 f" -> step {_ms(r.t_overlap)}..{_ms(r.t_serial)}, MFU bound "
                 f"{100 * r.mfu_serial:.0f}..{100 * r.mfu_overlap:.0f}% "
                 "(no overlap..perfect overlap)")
    if r.mfu_high:
        lines.append(f"expected: MFU {_pct_range(r)}, step {_step_range(r)} (the perfect-"
                     f"overlap bound x the {r.mfu_basis}, lm/chips.py; smaller models "
                     "usually reach less)")
    if r.custom_calls:
        lines.append(f"kernels: {r.custom_calls} TPU custom calls (Pallas / Mosaic)")
    if r.low_precision_dots:  # quantized training (quant.mode=train)
        lines.append("quantized matmuls: " + ", ".join(
            f"{n} {dtype}" for dtype, n in sorted(r.low_precision_dots.items())))
    return "\n".join(lines)


# ------------------------------------------------------------------- --suggest

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(cfg: TrainConfig, chips: int, remats=("none", "full")) -> list[TrainConfig]:
    """Meshes data x fsdp x tensor (sequence when the sequence is long) over `chips`
    that the shapes allow, each with each remat policy."""
    m = cfg.model
    out = []
    for tensor in _divisors(chips):
        if tensor > 8 or m.n_heads % tensor:  # beyond 8, tensor parallelism leaves the ICI
            continue                          # neighbourhood and heads rarely divide
        for fsdp in _divisors(chips // tensor):
            data = chips // tensor // fsdp
            if cfg.batch_size % (data * fsdp):
                continue
            for remat in remats:
                mesh = dataclasses.replace(cfg.mesh, data=data, fsdp=fsdp, tensor=tensor,
                                           sequence=1)
                out.append(dataclasses.replace(cfg, mesh=mesh, model=dataclasses.replace(
                    m, remat=remat)))
    return out


def _rough_peak(cfg: TrainConfig, chips: int) -> float:
    """A compile-free guess of per-chip bytes to rank candidates: sharded state plus
    activations (~34 bytes x d_model per token per layer kept without remat, Korthikanti
    et al. 2022, in bf16; ~2 x d_model with full remat)."""
    from lm.model import count_params
    mc, mesh = cfg.model, cfg.mesh
    state_ways = mesh.fsdp * mesh.tensor
    state = count_params(mc)["total"] * 16 / state_ways  # f32 params, grads, Adam m and v
    tokens = cfg.batch_size * cfg.data.seq_len / (mesh.data * mesh.fsdp)
    per_layer = (34 if mc.remat == "none" else 2) * mc.d_model / max(1, mesh.tensor)
    return state + tokens * per_layer * mc.n_layers


def suggest(cfg: TrainConfig, topo: Topology, max_compiles: int = 4, devices=None) -> list[Report]:
    devices = devices if devices is not None else topology_devices(topo)
    cands = candidate_meshes(cfg, topo.chips)
    if topo.slices > 1:  # data parallelism across slices, the rest inside each
        cands = [dataclasses.replace(c, mesh=dataclasses.replace(
            c.mesh, data=c.mesh.data // topo.slices, dcn_data=topo.slices))
            for c in cands if c.mesh.data % topo.slices == 0]
    if not cands:
        raise ConfigError(f"no mesh of {topo.chips} chips divides batch_size="
                          f"{cfg.batch_size} and model.n_heads={cfg.model.n_heads}")
    hbm = topo.chip.hbm_bytes
    # Most promising first: fits by the rough guess, then least recompute, least tensor
    # parallelism (it talks every layer), then the smallest footprint.
    ranked = sorted(cands, key=lambda c: (_rough_peak(c, topo.chips) > hbm,
                                          c.model.remat != "none", c.mesh.tensor,
                                          _rough_peak(c, topo.chips)))
    reports = []
    for c in ranked[:max_compiles]:
        print(f"compiling {_mesh_label(c)} remat {c.model.remat} ...", file=sys.stderr, flush=True)
        reports.append(compile_report(c, topo, devices, eval_step=False))
    reports.sort(key=lambda r: (not r.fits, r.t_overlap if r.fits else r.peak_bytes))
    return reports


def _mesh_label(cfg: TrainConfig) -> str:
    m = cfg.mesh
    return " x ".join(f"{a}={getattr(m, a) * getattr(m, 'dcn_' + a)}"
                      for a in MESH_AXES
                      if getattr(m, a) * getattr(m, "dcn_" + a) > 1) or "data=1"


def format_suggestions(reports: list[Report], considered: int) -> str:
    head = (f"{'rank':<5}{'mesh':<28}{'remat':<7}{'fits':<6}{'peak/chip':>11}"
            f"{'est. step':>20}{'est. MFU':>10}")
    lines = [f"compiled {len(reports)} of {considered} candidate layouts (ranked by fit, then "
             "estimated step time; estimates, not measurements):", head]
    for i, r in enumerate(reports, 1):
        mesh = " x ".join(f"{a}={s}" for a, s in r.mesh.items())
        calibrated = r.fits and r.mfu_high > 0
        step = (_step_range(r) if calibrated else f">= {_ms(r.t_overlap)}" if r.fits else "-")
        mfu = _pct_range(r) if calibrated else (
            f"<= {100 * r.mfu_overlap:.0f}%" if r.fits else "-")
        peak = format_bytes(r.peak_bytes) if not r.error else "refused"
        lines.append(f"{i:<5}{mesh:<28}{r.remat:<7}{'yes' if r.fits else 'NO':<6}{peak:>11}"
                     f"{step:>20}{mfu:>10}")
    basis = next((r.mfu_basis for r in reports if r.fits and r.mfu_high), "")
    if basis:
        bounds = ", ".join(f"{100 * r.mfu_overlap:.0f}%" for r in reports if r.fits)
        lines.append(f"est. = the roofline's perfect-overlap bound (by rank: {bounds}; it knows "
                     f"no kernel efficiency) x the {basis} (MaxText's tables, lm/chips.py); "
                     "models under 8B have no published figure and usually reach less")
    return "\n".join(lines)


def run_compile(cfg: TrainConfig, topology: str, slices: int = 1, do_suggest: bool = False,
                max_compiles: int = 4, json_out: str = "", eval_step: bool = True,
                trials: int = 1) -> int:
    from lm import config as config_lib
    from lm.data import load_tokenizer
    from lm.errors import EXIT_USER_ERROR
    from lm.train.setup import with_vocab
    topo = parse_topology(topology, slices)
    if trials < 1 or (trials > 1 and do_suggest):
        raise ConfigError(f"--trials {trials}: must be >= 1 (and without --suggest)")
    cfg = config_lib.validate(with_vocab(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size))
    if do_suggest:
        reports = suggest(cfg, topo, max_compiles)
        print(format_suggestions(reports, len(candidate_meshes(cfg, topo.chips))))
        best = reports[0]
        if best.fits:
            sizes = {a: best.mesh.get(a, 1) for a in ("data", "fsdp", "tensor")}
            if topo.slices > 1:
                sizes["data"] //= topo.slices
                sizes["dcn_data"] = topo.slices
            flags = " ".join(f"--set mesh.{a}={v}" for a, v in sizes.items())
            flags += f" --set model.remat={best.remat}"
            print(f"best: lm compile --topology {topology} {flags}")
    else:
        reports = [compile_report(cfg, topo, eval_step=eval_step, trials=trials)]
        print(format_report(reports[0]))
    if json_out:
        import json
        from pathlib import Path
        Path(json_out).write_text(json.dumps([dataclasses.asdict(r) for r in reports], indent=1))
    if not any(r.fits for r in reports):
        r = reports[0]
        why = r.error or f"peak {format_bytes(r.peak_bytes)} of {format_bytes(r.hbm_bytes)} HBM per chip"
        if r.error and r.peak_bytes:
            why = f"it needs about {format_bytes(r.peak_bytes)} of {format_bytes(r.hbm_bytes)} HBM per chip ({r.error})"
        print(f"error: {r.config} does not fit on {r.topology}: {why} (try more fsdp or "
              "tensor, remat, a smaller batch; or lm compile --suggest)", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


__all__ = ["CHIPS", "Topology", "parse_topology", "topology_devices", "collectives_of",
           "compile_report", "format_report", "suggest", "run_compile", "quiet_libtpu"]
