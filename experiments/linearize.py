"""Linearization, measured (issue 33): the default model's shape trained as a
transformer (the parent), its attention layers turned into LoLCATs linear attention by
`lm linearize --to retention` (attention transfer; also the `--keep-window W` hybrid),
then LoRA-fine-tuned (`lm train --init-from LIN --set lora.rank=R`), against two fair
references on the same tokens: the parent trained F more steps (`--init-from PARENT`),
and the linearized model's shape trained from scratch for P + F steps. Then decoding at
2k and 8k tokens, parent against linearized: a prompt of L tokens prefilled, N tokens
decoded greedily (lm.sample.generate, the loop `lm sample` falls back on; its timings
split the first token from the rest), the decode tokens/s and the bytes of the decode
state (the KV cache / recurrent state pytree the decode holds: model.init_cache).

Every run is made by the CLI as a user runs it (`python -m lm.cli train / linearize /
eval` subprocesses); the decode runs in this process on the runs' checkpoints, with the
eval-time knob model.max_seq_len raised to L + N (the parameters fit unchanged).

    python experiments/linearize.py --workdir runs/linearize            # ~26 min, busy 2-core CPU
    python experiments/linearize.py --workdir runs/linearize --seeds 2  # the loss rows with intervals
    python experiments/linearize.py --workdir runs/linearize_smoke --smoke   # tiny; < 60 s

Writes WORKDIR/results.json and prints the markdown tables. Runs already completed in
WORKDIR (summary.json status completed; linearize.json written) and the decode rows
(WORKDIR/decode.json) are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

SCALE = {
    # The default model (lm/configs/default.py: d_model 128, 4 layers, 4 heads; byte-level
    # Shakespeare) with its training shortened to fit a 2-core CPU.
    "full": dict(model=[], seq_len=128, batch=16, parent_steps=400, finetune_steps=100,
                 transfer_steps=100, keep_window=16, lora_rank=8, lr=3e-3, finetune_lr=1e-3,
                 eval_batches=8, decode_lengths=(2048, 8192), decode_tokens=32),
    "smoke": dict(model=["model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                         "model.max_seq_len=32"],
                  seq_len=32, batch=4, parent_steps=6, finetune_steps=3, transfer_steps=3,
                  keep_window=8, lora_rank=4, lr=3e-3, finetune_lr=1e-3, eval_batches=1,
                  decode_lengths=(64, 128), decode_tokens=4),
}
LOSS_ROWS = {  # results key -> the table's row
    "parent": "parent (P steps)",
    "parent_more": "parent + F steps (full fine-tune)",
    "linearized": "linearized (attention transfer)",
    "linearized_lora": "linearized + LoRA (F steps)",
    "window": "linearized, keep-window W (transfer)",
    "window_lora": "linearized, keep-window W + LoRA (F steps)",
    "scratch": "hybrid shape from scratch (P + F steps)",
}


IN_PROCESS = False  # --smoke: the commands run in this process (lm.cli.main), no start-ups


def lm(*args: str) -> str:
    """`python -m lm.cli ARGS` as a user runs it; its stdout (exits on failure with the
    command's stderr tail)."""
    cmd = [sys.executable, "-m", "lm.cli", *args]
    start = time.time()
    if IN_PROCESS:
        import contextlib
        import io

        from lm.cli import main as lm_main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = lm_main(list(args))
        if code:
            sys.exit(f"failed ({code}): {' '.join(cmd)}")
        print(f"[{time.time() - start:5.1f} s] lm {' '.join(args[:2])} (in process)",
              file=sys.stderr, flush=True)
        return out.getvalue()
    result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    print(f"[{time.time() - start:5.1f} s] lm {' '.join(args[:2])}", file=sys.stderr, flush=True)
    if result.returncode:
        sys.stderr.write(result.stdout[-2000:] + result.stderr[-4000:])
        sys.exit(f"failed ({result.returncode}): {' '.join(cmd)}")
    return result.stdout


def sets(items) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def training(s: dict, steps: int, lr: float, seed: int) -> list[str]:
    return [*s["model"], f"data.seq_len={s['seq_len']}", f"batch_size={s['batch']}",
            f"steps={steps}", f"log_every={max(1, steps // 5)}", f"eval_every={steps}",
            "eval_batches=2", f"checkpoint_every={steps}", "tensorboard=false",
            f"optim.lr={lr}", f"optim.warmup_steps={max(1, steps // 10)}", f"seed={seed}"]


def _completed(run: Path) -> bool:
    summary = run / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "completed"


def train(run: Path, overrides: list[str], init_from: str = "") -> None:
    """`lm train` into `run` unless it completed before (an unfinished one resumes)."""
    if _completed(run):
        return
    lm("train", "--run-dir", str(run), *(["--init-from", init_from] if init_from else []),
       *sets(overrides))


def eval_loss(run: Path, batches: int) -> float:
    """`lm eval --run RUN --batches K`'s validation loss (nats/token)."""
    out = lm("eval", "--run", str(run), "--batches", str(batches))
    return json.loads(out.strip().splitlines()[-1])["val_loss"]


def model_differences(run: Path, base: Path) -> list[str]:
    """`model.KEY=VALUE` for each model knob where `run`'s config differs from `base`'s:
    the linearized shape as overrides of the parent's (for the from-scratch reference)."""
    def flat(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    want = dict(flat(json.loads((run / "config.json").read_text())["model"], "model."))
    have = dict(flat(json.loads((base / "config.json").read_text())["model"], "model."))
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}"
            for k, v in want.items() if have.get(k) != v]


def seed_losses(work: Path, s: dict, seed: int, window: bool) -> dict:
    """The loss rows of one seed: every run trained (or reused) and evaluated alike."""
    P, F = s["parent_steps"], s["finetune_steps"]
    d = work / f"seed{seed}"
    parent, lin, win = d / "parent", d / "lin", d / "lin_window"
    train(parent, training(s, P, s["lr"], seed))
    for out, extra in ((lin, []), (win, ["--keep-window", str(s["keep_window"])])):
        if out == win and not window:
            continue
        if not (out / "linearize.json").exists():
            lm("linearize", str(parent), "--to", "retention", "--out", str(out),
               "--transfer-steps", str(s["transfer_steps"]), "--seed", str(seed),
               "--eval-batches", str(s["eval_batches"]), *extra)
    # The from-scratch reference (the longest run) trains beside the fine-tunes: two
    # processes take a larger share of a shared machine (subprocesses only).
    scratch_args = (d / "scratch", training(s, P + F, s["lr"], seed)
                    + model_differences(lin, parent))
    scratch = threading.Thread(target=train, args=scratch_args)
    if IN_PROCESS:  # (lm train sets signal handlers: the main thread only)
        train(*scratch_args)
    else:
        scratch.start()
    lora = [f"lora.rank={s['lora_rank']}"]
    train(d / "lin_lora", training(s, F, s["finetune_lr"], seed) + lora, init_from=str(lin))
    if window:
        train(d / "lin_window_lora", training(s, F, s["finetune_lr"], seed) + lora,
              init_from=str(win))
    train(d / "parent_more", training(s, F, s["finetune_lr"], seed), init_from=str(parent))
    if scratch.is_alive():
        scratch.join()
    if not _completed(d / "scratch"):
        sys.exit(f"the from-scratch reference {d / 'scratch'} did not complete")
    runs = {"parent": parent, "parent_more": d / "parent_more", "linearized": lin,
            "linearized_lora": d / "lin_lora", "scratch": d / "scratch"}
    if window:
        runs.update(window=win, window_lora=d / "lin_window_lora")
    losses = {name: eval_loss(run, s["eval_batches"]) for name, run in runs.items()}
    transfer = json.loads((lin / "linearize.json").read_text())
    losses["_transfer_relative_mse"] = {
        "before": [v["relative"] for v in transfer["mse_before"].values()],
        "after": [v["relative"] for v in transfer["mse_after"].values()]}
    return losses


def decode_row(run: Path, length: int, new_tokens: int) -> dict:
    """Prefill `length` tokens of validation text, decode `new_tokens` greedily: the
    decode tokens/s (a warm-up generation first compiles both programs, so the measured
    one runs compiled), the first token's time and the decode state's bytes."""
    import jax
    from flax import nnx

    from lm.evals.overrides import eval_time_graphdef
    from lm.sample import cache_length, generate
    from lm.train.param_source import restore_for_inference
    setup, params, _ = restore_for_inference(run)
    max_len = length + new_tokens
    graphdef, cfg = eval_time_graphdef(setup, [f"model.max_seq_len={max_len}"])
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    ids = [int(i) for i in setup.tokenizer.encode(text)]
    prompt = (ids * (length // len(ids) + 1))[:length]
    slots = cache_length(length, new_tokens, max_len)  # what generate allocates
    model = nnx.merge(graphdef, params)
    cache = jax.eval_shape(lambda: model.init_cache(1, slots))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    kw = dict(temperature=0.0, max_seq_len=max_len)
    generate(graphdef, params, prompt, 2, **kw)  # compiles prefill and decode (same shapes)
    t: dict = {}
    generate(graphdef, params, prompt, new_tokens, timings=t, **kw)
    return {"length": length, "new_tokens": new_tokens, "state_bytes": int(state_bytes),
            "tokens_per_s": t["decode_tokens"] / t["decode_s"],
            "prefill_s": t["first_token_s"], "mixer_pattern": cfg.model.mixer_pattern}


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def loss_table(rows: dict, seeds: list[int]) -> str:
    from lm.analysis.seeds import interval
    head = "| model | val loss " + ("(mean ± 95% CI)" if len(seeds) > 1 else f"(seed {seeds[0]})") + " |"
    lines = [head, "|---|---|"]
    for key, label in LOSS_ROWS.items():
        if key in rows:
            lines.append(f"| {label} | {interval(rows[key])} |")
    return "\n".join(lines)


def decode_table(decode: dict) -> str:
    lines = ["| model | context | decode tok/s | prefill s | decode state |", "|---|---|---|---|---|"]
    for name, rows in decode.items():
        for r in rows:
            lines.append(f"| {name} ({r['mixer_pattern']}) | {r['length']} | "
                         f"{r['tokens_per_s']:.1f} | {r['prefill_s']:.2f} | "
                         f"{fmt_bytes(r['state_bytes'])} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="runs/linearize")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--seeds", type=int, default=1, help="seeds of the loss rows (intervals "
                   "from 2 on); the decode rows use seed 0")
    p.add_argument("--no-window", action="store_true", help="skip the --keep-window rows "
                   "(always skipped with --smoke)")
    p.add_argument("--in-process", action="store_true", help="run the lm commands in this "
                   "process (lm.cli.main) instead of subprocesses (the default with --smoke: "
                   "no interpreter start-ups)")
    args = p.parse_args()
    global IN_PROCESS
    IN_PROCESS = args.in_process or args.smoke
    s = SCALE["smoke" if args.smoke else "full"]
    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    seeds = list(range(args.seeds))
    window = not (args.no_window or args.smoke)
    per_seed = {seed: seed_losses(work, s, seed, window) for seed in seeds}
    rows = {k: [per_seed[sd][k] for sd in seeds] for k in LOSS_ROWS if k in per_seed[0]}

    decode = {"parent": [], "linearized": []}
    runs = {"parent": work / "seed0" / "parent", "linearized": work / "seed0" / "lin"}
    if window:
        decode["linearized, window"] = []
        runs["linearized, window"] = work / "seed0" / "lin_window"
    measured = work / "decode.json"  # kept: a rerun reuses the decode rows (slow at 8k)
    if measured.exists() and set(json.loads(measured.read_text())) == set(runs):
        decode = json.loads(measured.read_text())
    else:
        for length in s["decode_lengths"]:
            for name, run in runs.items():
                decode[name].append(decode_row(run, length, s["decode_tokens"]))
        measured.write_text(json.dumps(decode, indent=2))

    from lm.analysis.seeds import interval
    results = {
        "scale": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
        "seeds": seeds,
        "loss": {k: {"values": v, "mean": interval(v).mean,
                     "ci95": [interval(v).lo, interval(v).hi]} for k, v in rows.items()},
        "transfer_relative_mse": {sd: per_seed[sd]["_transfer_relative_mse"] for sd in seeds},
        "decode": decode,
        "wall_s": time.time() - start,
    }
    (work / "results.json").write_text(json.dumps(results, indent=2))
    P, F, W = s["parent_steps"], s["finetune_steps"], s["keep_window"]
    print(f"\nValidation loss (nats/token, {s['eval_batches']} batches of {s['batch']} x "
          f"{s['seq_len']}); P = {P}, F = {F}, W = {W}, transfer {s['transfer_steps']} steps, "
          f"LoRA rank {s['lora_rank']}:\n")
    print(loss_table(rows, seeds))
    print(f"\nDecoding (greedy, {s['decode_tokens']} tokens after a prompt of the context's "
          "length; batch 1):\n")
    print(decode_table(decode))
    print(f"\nwall {results['wall_s']:.0f} s; wrote {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
