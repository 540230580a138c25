"""Where a config's train step spends its time on this machine: runs the compiled step
under the JAX profiler and prints the top XLA ops by total time, with the model source
they come from (the op_name metadata of the first instruction in each fusion).

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python benchmarks/profile_step.py \
        --config configs/bench_5m.py [--steps 3] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_xprof_traceme=true")

import jax  # noqa: E402

from lm.cli.command import load_config as _load  # noqa: E402
from lm.data import train_iterator  # noqa: E402
from lm.train.setup import setup_run  # noqa: E402


def op_sources(hlo_text: str) -> dict[str, str]:
    """fusion / instruction name -> op_name metadata of the first instruction inside."""
    out, computation_of = {}, {}
    current = None
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?calls=%?([\w.\-]+)", line)
        if m:
            computation_of[m.group(1)] = m.group(2)
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*op_name=\"([^\"]+)\"", line)
        if m:
            out.setdefault(m.group(1), m.group(2))
            if current:
                out.setdefault(f"@{current}", m.group(2))
    for inst, comp in computation_of.items():
        if f"@{comp}" in out:
            out.setdefault(inst, out[f"@{comp}"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/bench_5m.py")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    cfg = _load(argparse.Namespace(config=args.config, overrides=args.overrides))
    run = setup_run(cfg)
    cfg, pieces = run.cfg, run.pieces
    data = train_iterator(cfg.data, run.tokenizer, cfg.batch_size, cfg.seed)
    batches = [pieces.global_batch(next(data)) for _ in range(args.steps + 1)]
    state = pieces.init_state()
    compiled, _ = pieces.compile_train_step()
    state, m = compiled(state, batches[0])
    jax.block_until_ready(m)
    sources = op_sources(compiled.as_text())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for b in batches[1:]:
                state, m = compiled(state, b)
            jax.block_until_ready(m)
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb",
                                                            recursive=True)[0])
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    step_ns = 0.0
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                name = ev.name
                if name in sources or re.match(r"^(fusion|dot|convolution|copy|transpose|"
                                               r"reduce|concatenate|custom-call)", name):
                    totals[name] += ev.duration_ns
                    counts[name] += 1
                    step_ns += ev.duration_ns
    print(f"{sum(counts.values())} op events over {args.steps} steps; op time per step "
          f"{step_ns / args.steps / 1e6:.1f} ms (both cores' threads summed)")
    by_source: dict[str, float] = collections.defaultdict(float)
    for name, ns in totals.items():
        src = sources.get(name, "?")
        by_source[re.sub(r"\[\d+\]|\d+", "", src.split("/")[-1])[:60]] += ns
    print(f"\n{'op':<34} {'ms/step':>8}  source")
    for name, ns in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{name:<34} {ns / args.steps / 1e6:>8.1f}  {sources.get(name, '?')[:90]}")
    print(f"\n{'source op (last path element)':<60} {'ms/step':>8}")
    for src, ns in sorted(by_source.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{src:<60} {ns / args.steps / 1e6:>8.1f}")


if __name__ == "__main__":
    main()
