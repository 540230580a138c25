"""Length generalisation of a small model, the LM-Infinite-style comparison: trained at
one length, evaluated at 1x..8x that length with plain RoPE, position interpolation
(linear, factor = length / trained), YaRN (factor likewise, original = trained) and the
Λ mask (window = trained length, 4 sink tokens), all applied at evaluation time only.

Two runs: a model trained on the Shakespeare corpus (loss by length; the validation
works are unseen plays) and one trained on the synthetic passkey corpus (retrieval
accuracy by length x depth). Prints markdown tables; writes the loss-by-position curves
and the passkey heat maps next to the runs.

    python experiments/long_context.py --workdir runs/long_context            # ~30 min on a busy 2-core CPU
    python experiments/long_context.py --workdir runs/long_context_smoke --smoke  # 2 x 30 steps; ~12 min
                                                  # on a heavily shared 2-core CPU (mostly compiles)

Note: our Λ mask is LM-Infinite's attention mask only; LM-Infinite also caps the
distance RoPE sees for the sink tokens at the trained length, which is not done here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lm.cli import main as lm_main
from lm.evals.lengths import loss_by_length, plot_loss_by_position
from lm.evals.passkey import plot_heatmap, run_passkey
from lm.train.param_source import restore_for_inference

MODEL = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "tensorboard=false"]
SCALE = {
    "full": dict(train_len=128, steps=300, passkey_steps=600, batch=8, multiples=(1, 2, 4, 8),
                 eval_batches=2, trials=10, depths="0,0.5,1"),
    "smoke": dict(train_len=80, steps=30, passkey_steps=30, batch=8, multiples=(1, 2),
                  eval_batches=1, trials=2, depths="0,1"),
}


def variants(train_len: int, length: int) -> dict[str, list[str]]:
    f = max(1.0, length / train_len)
    return {
        "rope": [],
        "pi": [f"model.rope_scaling.type=linear", f"model.rope_scaling.factor={f}"],
        "yarn": [f"model.rope_scaling.type=yarn", f"model.rope_scaling.factor={f}"],
        "lambda": [f"model.attention.window={train_len}", "model.attention.sinks=4"],
    }


def train(run: Path, corpus: str, s: dict, steps: int) -> None:
    if (run / "summary.json").exists():
        return
    t = s["train_len"]
    args = MODEL + [f"data.corpus={corpus}", f"data.seq_len={t}", f"model.max_seq_len={t}",
                    f"batch_size={s['batch']}", f"steps={steps}", f"log_every={max(1, steps // 10)}",
                    f"eval_every={steps}", "eval_batches=4", f"checkpoint_every={steps}",
                    f"optim.warmup_steps={max(1, steps // 20)}", "optim.lr=3e-3"]
    code = lm_main(["train", "--run-dir", str(run), *[x for a in args for x in ("--set", a)]])
    if code:
        sys.exit(code)


def table(rows: dict[str, dict[int, float]], lengths, fmt: str) -> str:
    head = "| variant | " + " | ".join(f"{n}" for n in lengths) + " |"
    sep = "|---" * (len(lengths) + 1) + "|"
    body = [f"| {name} | " + " | ".join(fmt.format(v[n]) for n in lengths) + " |"
            for name, v in rows.items()]
    return "\n".join([head, sep, *body])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="runs/long_context")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    s = SCALE["smoke" if args.smoke else "full"]
    work = Path(args.workdir)
    t = s["train_len"]
    lengths = [t * m for m in s["multiples"]]
    report: dict = {"scale": s, "lengths": lengths}

    text_run, key_run = work / "shakespeare", work / "passkey"
    train(text_run, "shakespeare", s, s["steps"])
    train(key_run, "passkey", s, s["passkey_steps"])

    run, params, _ = restore_for_inference(text_run)
    losses: dict[str, dict[int, float]] = {}
    curves = {}
    for n in lengths:
        for name, over in variants(t, n).items():
            r = loss_by_length(run, params, [n], over, max_batches=s["eval_batches"])[0]
            losses.setdefault(name, {})[n] = r["loss"]
            curves.setdefault(name, []).append(r)
    for name, rs in curves.items():
        plot_loss_by_position(rs, work / f"loss_by_position_{name}.png", trained_length=t,
                              title=f"Shakespeare, trained at {t}: {name}")
    report["loss"] = losses

    run, params, _ = restore_for_inference(key_run)
    depths = [float(d) for d in s["depths"].split(",")]
    accuracy: dict[str, dict[int, float]] = {}
    for n in lengths:
        for name, over in variants(t, n).items():
            rep = run_passkey(run, params, [n], depths, over, trials=s["trials"], seed=0)
            accuracy.setdefault(name, {})[n] = sum(rep["accuracy"][0]) / len(depths)
            report.setdefault("passkey", {}).setdefault(name, {})[n] = rep["accuracy"][0]
    for name in accuracy:
        grid = {"lengths": lengths, "depths": depths,
                "accuracy": [report["passkey"][name][n] for n in lengths], "overrides": [name]}
        plot_heatmap(grid, work / f"passkey_{name}.png", title=f"passkey accuracy: {name}")
    (work / "report.json").write_text(json.dumps(report, indent=2))

    print(f"\nValidation loss (nats/token) by evaluation length, trained at {t}:\n")
    print(table(losses, lengths, "{:.3f}"))
    print(f"\nPasskey accuracy (mean over depths {s['depths']}, {s['trials']} keys each):\n")
    print(table(accuracy, lengths, "{:.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
