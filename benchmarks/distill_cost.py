"""What distillation costs per step: the same student's train step without a teacher and
with one (its forward inside the step, lm/compress), timed in interleaved rounds so
that drift of a shared machine hits both arms alike. Prints the median step time of
each arm, their ratio, and the FLOPs per token each step accounts for (the student's
training FLOPs; plus the teacher's forward).

    python benchmarks/distill_cost.py                      # default model as the teacher
    python benchmarks/distill_cost.py --teacher-set model.d_model=256 --rounds 7
    python benchmarks/distill_cost.py --student-set model.d_model=64 \
        --student-set distill.hidden_weight=1 --student-set distill.relation_weight=1

The teacher is the config's model (with --teacher-set on top), the student the same
config with --student-set (default: half the width); both at their seed's init (the
cost does not depend on the weights), on this machine's devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from lm.compress.distill import DistillConfig, Plan, hidden, layer_pairs, relations  # noqa: E402
from lm.compress.teacher import Teacher, relation_plan  # noqa: E402
from lm.config import resolve  # noqa: E402
from lm.configs import DEFAULT_CONFIG  # noqa: E402
from lm.data import eval_batches  # noqa: E402
from lm.model import flops_per_token  # noqa: E402
from lm.train.param_source import RunCheckpoint  # noqa: E402
from lm.train.setup import setup_run  # noqa: E402
from lm.train.state import build  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", dest="common", action="append", default=[],
                   help="override for both (e.g. batch_size=16)")
    p.add_argument("--student-set", action="append", default=None,
                   help="student overrides (default: model.d_model = half the teacher's)")
    p.add_argument("--teacher-set", action="append", default=[])
    p.add_argument("--kind", default="forward_kl")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per arm per round")
    args = p.parse_args()

    t_cfg = resolve(args.config, [*args.common, *args.teacher_set])
    student_set = args.student_set or [f"model.d_model={t_cfg.model.d_model // 2}"]
    s_cfg = resolve(args.config, [*args.common, *args.teacher_set, *student_set,
                                  "distill.teacher=(benchmark)", f"distill.kind={args.kind}",
                                  f"distill.teacher_width={t_cfg.model.d_model}"])
    plain = setup_run(dataclasses.replace(s_cfg, distill=DistillConfig()))
    setup = setup_run(s_cfg)
    t_cfg = dataclasses.replace(t_cfg, mesh=s_cfg.mesh, batch_size=s_cfg.batch_size,
                                model=dataclasses.replace(
                                    t_cfg.model, vocab_size=setup.cfg.model.vocab_size))
    t_pieces = build(t_cfg, setup.pieces.mesh)
    d = setup.cfg.distill
    plan = Plan(layer_pairs(d, setup.cfg.model.n_layers, t_cfg.model.n_layers) if hidden(d) else (),
                relation_plan(setup.cfg, t_cfg) if relations(d) else None)
    teacher = Teacher(t_cfg, t_pieces, RunCheckpoint(Path("(benchmark)")), plan)
    setup.pieces.teacher = teacher
    t_params = t_pieces.init_state()["params"]

    batches = [setup.pieces.replicated_batch(b) for b in
               eval_batches(setup.cfg.data, setup.tokenizer, setup.cfg.batch_size, 4)]
    arms = {"student alone": (plain, ()), "with teacher": (setup, (t_params,))}
    compiled, states = {}, {}
    for name, (run, extra) in arms.items():
        t0 = time.perf_counter()
        compiled[name] = run.compiled_train_step()[0]
        states[name] = run.pieces.init_state()
        print(f"{name}: compiled in {time.perf_counter() - t0:.1f}s", flush=True)

    def run_arm(name: str, steps: int) -> float:
        step, extra = compiled[name], arms[name][1]
        state = states[name]
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = step(state, batches[i % len(batches)], *extra)
        jax.block_until_ready(metrics["loss"])
        states[name] = state
        return (time.perf_counter() - t0) / steps

    for name in arms:  # warm-up
        run_arm(name, 2)
    times = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name in arms:
            times[name].append(run_arm(name, args.steps))

    tokens = setup.cfg.batch_size * setup.cfg.data.seq_len
    s_fpt = flops_per_token(setup.cfg.model, setup.cfg.data.seq_len)
    t_fwd = teacher.forward_flops_per_token()
    fpt = {"student alone": s_fpt, "with teacher": s_fpt + t_fwd}
    sm, tm = setup.cfg.model, t_cfg.model
    print(f"\nstudent d_model={sm.d_model} n_layers={sm.n_layers}; teacher d_model={tm.d_model} "
          f"n_layers={tm.n_layers}; batch {setup.cfg.batch_size} x seq {setup.cfg.data.seq_len}; "
          f"{args.kind}{'' if not plan.hidden else ', hidden states'}"
          f"{'' if plan.relation is None else ', attention relations'}; {jax.device_count()} {jax.devices()[0].platform} device(s); "
          f"{args.rounds} interleaved rounds x {args.steps} steps\n")
    print("| arm | median step time (ms) | min..max (ms) | tokens/s | MFLOP/token (accounted) |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.2f} | {min(ts) * 1e3:.2f}..{max(ts) * 1e3:.2f} | "
              f"{tokens / med:,.0f} | {fpt[name] / 1e6:.3f} |")
    ratio = statistics.median(times["with teacher"]) / statistics.median(times["student alone"])
    print(f"\nstep time with teacher / without: {ratio:.2f}x "
          f"(FLOPs ratio {fpt['with teacher'] / fpt['student alone']:.2f}x)")


if __name__ == "__main__":
    main()
