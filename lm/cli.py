"""`lm train | eval | sample | bench | compile | import hf | export hf | data prepare | launch
{local,tpu,slurm}`.

User-caused errors (bad config, bad data, missing run) print one line and exit 2; a full
disk anywhere prints one line naming the path and exits 4 (lm/errors.py holds the exit
codes, README "When things go wrong" what each means).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from lm.configs import DEFAULT_CONFIG
from lm.errors import EXIT_DISK_FULL, EXIT_USER_ERROR, find_disk_full


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="Python config file with a config() function (default: configs/default.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.n_layers=4 (repeatable)")


def _load(args):
    from lm.config import resolve
    overrides = list(args.overrides)
    if getattr(args, "init_from", ""):
        overrides.append(f"init_from={args.init_from}")
    cfg = resolve(args.config, overrides)
    if cfg.init_from:  # the source fixes the model (lm/train/init_from.py)
        from lm.train.init_from import with_source_model
        cfg = with_source_model(cfg, overrides)
    return cfg


def cmd_train(args) -> int:
    from lm.train.loop import train
    cfg = _load(args)
    return train(cfg, args.run_dir or f"runs/{cfg.name}")


def cmd_train_group(args) -> int:
    """Trials batched as one program (`lm sweep --batch` writes the group file)."""
    from pathlib import Path

    from lm.config import ConfigError, apply_overrides, load_config_file
    from lm.train.trials import train_group
    try:
        spec = json.loads(Path(args.group).read_text())
        base = load_config_file(spec["base_config"])
        trials = spec["trials"]
        cfgs = [apply_overrides(base, t["overrides"]) for t in trials]
        dirs = [t["run_dir"] for t in trials]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"train-group {args.group}: not a group file ({e})") from None
    codes = train_group(cfgs, dirs)
    signalled = [c for c in codes if c > 128]
    return signalled[0] if signalled else max(codes)


def cmd_eval(args) -> int:
    from lm.data import eval_batches
    from lm.train.loop import evaluate
    from lm.train.setup import restore_for_inference
    if args.lengths or args.task != "loss" or args.overrides:
        if args.lora_rank:
            from lm.config import ConfigError
            raise ConfigError("lm eval --lora-rank works with the plain loss evaluation "
                              "only (not with --lengths / --task / --set)")
        from lm.evals.cli import run_eval
        return run_eval(args)
    run, params, step = restore_for_inference(args.run, lora_rank=args.lora_rank)
    batches = eval_batches(run.cfg.data, run.tokenizer, run.cfg.batch_size, args.batches)
    result = evaluate(run.pieces, run.pieces.eval_step(), params, batches, run.tokenizer)
    print(json.dumps({"step": step, "val_loss": result["loss"], "val_bpb": result["bpb"],
                      "batches": len(batches)}))
    return 0


def _check_sampling_flags(args) -> None:
    """Refuse values that would sample nonsense (a negative temperature flips the
    distribution, top-p > 1 or top-k < 0 silently mean "off") before a run is read."""
    from lm.config import ConfigError
    for flag, value, ok, want in (
            ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
            ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0 = greedy)"),
            ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0 = off)"),
            ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1] (1 = off)"),
            ("--num-samples", args.num_samples, args.num_samples >= 1, ">= 1")):
        if not ok:  # (NaN fails every comparison)
            raise ConfigError(f"lm sample {flag} must be {want}, got {value}")


def cmd_sample(args) -> int:
    from lm.sample import generate
    from lm.train.setup import restore_for_inference
    from lm.evals.overrides import check_keys, eval_time_graphdef
    _check_sampling_flags(args)
    check_keys(args.overrides)
    run, params, step = restore_for_inference(args.run)
    print(f"sampling from {args.run} at checkpoint step {step}", file=sys.stderr, flush=True)
    # Eval-time knobs (a Λ mask, RoPE scaling, a longer max_seq_len = a longer KV cache).
    graphdef, cfg = eval_time_graphdef(run, args.overrides)
    tokenizer = run.tokenizer
    prompt = [tokenizer.bos_id] + list(tokenizer.encode(args.prompt))
    outs = generate(graphdef, params, prompt, args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, num_samples=args.num_samples,
                    max_seq_len=cfg.model.max_seq_len, eos_id=tokenizer.eos_id)
    for i, ids in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(args.prompt + tokenizer.decode(ids))
    return 0


def cmd_import_hf(args) -> int:
    from lm.interop.hf_import import import_hf
    return import_hf(args.path, args.run_dir)


def cmd_export_hf(args) -> int:
    from lm.interop.hf_export import export_hf
    return export_hf(args.run, args.out, peft=args.peft)


def cmd_bench(args) -> int:
    from lm.bench import bench
    bench(_load(args), steps=args.steps, loop_rounds=args.loop_rounds)
    return 0


def cmd_compile(args) -> int:
    from lm.compile import run_compile
    return run_compile(_load(args), args.topology, slices=args.slices, do_suggest=args.suggest,
                       max_compiles=args.max_compiles, json_out=args.json,
                       eval_step=not args.train_only, trials=args.trials)


def cmd_data_prepare(args) -> int:
    from lm.data import prepare
    cfg = _load(args)
    stats = prepare(cfg.data, args.out)
    print(json.dumps(stats))
    print(f"prepared {args.out}; train on it with --set data.corpus={args.out}")
    return 0


def cmd_launch(args) -> int:
    from lm.config import ConfigError
    if args.remote is None:
        raise ConfigError(f"lm launch {args.launch_command}: put the lm command after --, "
                          f"e.g. lm launch {args.launch_command} ... -- train --config C")
    if not args.remote:
        raise ConfigError(f"lm launch {args.launch_command}: no command after --")
    if args.remote[0] in ("lm", "lm.cli"):  # tolerate `-- lm train ...`
        args.remote = args.remote[1:]
    if args.launch_command == "local":
        from lm.launch.local import run_local
        return run_local(args.processes, args.devices_per_process, args.remote, port=args.port)
    if args.launch_command == "tpu":
        from lm.launch.tpu import launch
        return launch(args.name, args.zone, args.accelerator, args.remote, spot=args.spot,
                      project=args.project, runtime_version=args.runtime_version,
                      fetch=args.fetch, dry_run=args.dry_run, poll_s=args.poll_seconds)
    from lm.launch.slurm import launch
    if not args.job_name or "/" in args.job_name:
        raise ConfigError(f"--job-name {args.job_name!r} must be a non-empty name without '/'")
    return launch(args.nodes, args.gpus_per_node, args.remote, partition=args.partition,
                  time=args.time, job_name=args.job_name, per=args.per, dry_run=args.dry_run)


def cmd_sweep(args) -> int:
    from lm.sweep.runner import run_sweep
    return run_sweep(args.spec, args.workdir, parallel=args.parallel, dry_run=args.dry_run,
                     smoke=args.smoke, launch=shlex.split(args.launch), batch=args.batch)


def cmd_results(args) -> int:
    from lm.sweep.report import results_table
    print(results_table(args.workdir))
    return 0


def cmd_analyze(args) -> int:
    if args.coord_check:
        return cmd_coord_check(args.workdir)
    if args.lr_transfer or args.optimizers:
        from lm.analysis import transfer
        print(transfer.report(args.workdir, optimizers=args.optimizers))
        return 0
    from lm.sweep.report import analyze
    return analyze(args.workdir, full_grid=args.full_grid, n_boot=args.n_boot,
                   params=args.params)


def cmd_coord_check(workdir: str) -> int:
    from pathlib import Path

    from lm.analysis import coord_check
    from lm.config import ConfigError
    if not (Path(workdir) / coord_check.FILE).exists():
        raise ConfigError(f"lm analyze --coord-check: no {coord_check.FILE} in {workdir} "
                          "(run experiments/coord_check.py --workdir DIR first)")
    print(coord_check.report(workdir))
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors of `lm launch ...` as one line, exit 2."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message}\n")


def _add_launch(sub) -> None:
    p = sub.add_parser("launch", help="run an lm command as a multi-process pod",
                       description="lm launch {local,tpu,slurm} [options] -- <lm command>")
    launch_sub = p.add_subparsers(dest="launch_command", required=True,
                                  parser_class=_OneLineParser)
    q = launch_sub.add_parser("local", help="P processes on this machine, D CPU devices each")
    q.add_argument("--processes", type=int, required=True)
    q.add_argument("--devices-per-process", type=int, default=1)
    q.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    q = launch_sub.add_parser("tpu", help="a Cloud TPU slice via a queued resource (gcloud)")
    q.add_argument("--name", required=True, help="queued resource and node id")
    q.add_argument("--zone", required=True)
    q.add_argument("--accelerator", required=True, help="accelerator type, e.g. v5p-64")
    q.add_argument("--spot", action="store_true")
    q.add_argument("--project", default="")
    q.add_argument("--runtime-version", default="", help="default: by accelerator generation")
    q.add_argument("--fetch", default="runs",
                   help="path under the repo copied back from worker 0 ('' = none)")
    q.add_argument("--poll-seconds", type=float, default=30.0)
    q.add_argument("--dry-run", action="store_true", help="print the gcloud commands only")
    q = launch_sub.add_parser("slurm", help="an sbatch job; srun starts the processes")
    q.add_argument("--nodes", type=int, required=True)
    q.add_argument("--gpus-per-node", type=int, required=True)
    q.add_argument("--partition", default="")
    q.add_argument("--time", default="", help="e.g. 04:00:00")
    q.add_argument("--job-name", default="lm")
    q.add_argument("--per", choices=("gpu", "node"), default="gpu",
                   help="one process per GPU (default) or per node")
    q.add_argument("--dry-run", action="store_true", help="print the sbatch script only")
    p.set_defaults(fn=cmd_launch)


def _add_config(sub) -> None:
    """`lm config --show [SECTION] [--markdown]`: the knob reference (lm/config_reference.py)."""
    p = sub.add_parser("config", help="every config knob: type, default, roles, doc")
    p.add_argument("--show", nargs="?", const="", default="", metavar="SECTION",
                   help="one section (e.g. model.attention); default: all")
    p.add_argument("--markdown", action="store_true",
                   help="all built-in sections as docs/config-reference.md")

    def run(args) -> int:
        from lm import config_reference as ref
        print(ref.markdown() if args.markdown else ref.text(args.show or None), end="")
        return 0
    p.set_defaults(fn=run)


def _split_remote(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """`lm launch ... -- <command>`: (the launcher's args, the command or None)."""
    if argv[:1] != ["launch"] or "--" not in argv:
        return argv, None
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm", description="lmlab: train and study language models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a run")
    _config_args(p)
    p.add_argument("--run-dir", default="", help="run directory (default: runs/<name>)")
    p.add_argument("--init-from", default="", metavar="RUN_OR_HF_DIR",
                   help="start from these weights (an lmlab run or a Hugging Face model "
                        "dir), fresh optimizer; the same as --set init_from=...")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="validation loss and bits-per-byte of a run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--batches", type=int, default=0, help="0 = whole validation split "
                   "(with --lengths: 0 = 4 batches per length)")
    # Long-context evaluations (lm/evals): loss by length and position, passkey retrieval,
    # with eval-time attention / RoPE-scaling overrides.
    p.add_argument("--task", choices=("loss", "passkey"), default="loss")
    p.add_argument("--lengths", default="", help="e.g. 256,1024,4096: loss per length and "
                   "by position (with --task passkey: the prompt lengths)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="--task passkey: where the "
                   "key sits, as fractions of the filler")
    p.add_argument("--trials", type=int, default=20, help="--task passkey: keys per cell")
    p.add_argument("--seed", type=int, default=0, help="--task passkey: the keys and filler")
    p.add_argument("--batch-tokens", type=int, default=0,
                   help="--lengths: tokens per batch (0 = the run's batch_size x seq_len)")
    p.add_argument("--plot", default="", metavar="PNG", help="write the curve / heat map here")
    p.add_argument("--json", default="", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="eval-time model knob, e.g. --set model.attention.window=256 --set "
                   "model.attention.sinks=4 (Λ mask), --set model.rope_scaling.type=yarn")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="a LoRA / DyLoRA run's adapters up to this rank (0 = all)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("sample", help="generate text from a run's latest checkpoint")
    p.add_argument("--run", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="eval-time model knob (as for lm eval), e.g. --set "
                   "model.max_seq_len=1024 --set model.attention.window=128")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("bench", help="training throughput (tokens/s, MFU) of a config")
    _config_args(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    p.add_argument("--loop-rounds", type=int, default=2,
                   help="rounds of (bare step, lm train loop) measuring the loop's overhead "
                        "(0 = bare step only)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("prepare", help="tokenize a corpus once into shards")
    _config_args(q)
    q.add_argument("--out", required=True)
    q.set_defaults(fn=cmd_data_prepare)

    p = sub.add_parser("import", help="bring a model in from another format")
    q = p.add_subparsers(dest="import_command", required=True).add_parser(
        "hf", help="a local Hugging Face model directory -> an lmlab run directory")
    q.add_argument("path", help="directory with config.json, *.safetensors, tokenizer.json")
    q.add_argument("--run-dir", required=True)
    q.set_defaults(fn=cmd_import_hf)
    p = sub.add_parser("export", help="write a run's checkpoint in another format")
    q = p.add_subparsers(dest="export_command", required=True).add_parser(
        "hf", help="a run's latest checkpoint -> a Hugging Face model directory")
    q.add_argument("run", help="run directory")
    q.add_argument("--out", required=True)
    q.add_argument("--peft", action="store_true",
                   help="a LoRA run as a PEFT adapter directory (default: merged weights)")
    q.set_defaults(fn=cmd_export_hf)

    _add_launch(sub)

    p = sub.add_parser("sweep", help="run every trial of a sweep spec (experiments/*.py)")
    p.add_argument("spec", help="Python file with a sweep() function")
    p.add_argument("--workdir", required=True, help="one run dir per trial goes under it")
    p.add_argument("--parallel", type=int, default=1, help="trials at a time")
    p.add_argument("--dry-run", action="store_true", help="print each trial and its command")
    p.add_argument("--smoke", action="store_true", help="the spec's tiny smoke-test version")
    p.add_argument("--launch", default="", metavar="ARGS",
                   help='run each trial through `lm launch ARGS -- train ...`, e.g. '
                        '"local --processes 2" or "slurm --nodes 1 --gpus-per-node 8"')
    p.add_argument("--batch", type=int, default=None, metavar="K",
                   help="train up to K trials that differ only in scalars (LR, seed, warmup, "
                        "weight decay, z-loss, init scale) as one vmapped program "
                        "(default: the spec's Sweep.batch, else 1 = each alone)")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("train-group", help="train the trials of a group file as one "
                       "program (written by lm sweep --batch)")
    p.add_argument("group", help="<workdir>/groups/<group>.json")
    p.set_defaults(fn=cmd_train_group)

    p = sub.add_parser("compile", help="compile the train step for a TPU topology (no TPU "
                       "needed): memory per chip, collectives, FLOPs, estimated step time")
    _config_args(p)
    p.add_argument("--topology", required=True,
                   help="e.g. v5p-64, v5p:4x4x4, v6e-256, v5e:2x2 (libtpu names or accelerator types)")
    p.add_argument("--slices", type=int, default=1, help="multislice: slices over DCN")
    p.add_argument("--suggest", action="store_true",
                   help="enumerate meshes and remat policies, compile the most promising, rank")
    p.add_argument("--max-compiles", type=int, default=4, help="with --suggest")
    p.add_argument("--json", default="", metavar="PATH", help="also write the report(s) as JSON")
    p.add_argument("--train-only", action="store_true", help="skip the eval step's compile")
    p.add_argument("--trials", type=int, default=1, metavar="K",
                   help="compile the step of K batched trials of the config (lm sweep --batch)")
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("results", help="a table of the runs under a sweep workdir")
    p.add_argument("workdir")
    p.set_defaults(fn=cmd_results)

    p = sub.add_parser("analyze", help="LR-sensitivity / scaling-law fits and plots of a sweep")
    p.add_argument("workdir")
    p.add_argument("--full-grid", action="store_true",
                   help="fit the parametric law from Chinchilla's 4500 starts (default: 243)")
    p.add_argument("--n-boot", type=int, default=100, help="bootstrap resamples (0 = none)")
    p.add_argument("--params", choices=("total", "active"), default="total",
                   help="scaling laws in total or active (MoE: routed) parameters")
    p.add_argument("--coord-check", action="store_true",
                   help="render WORKDIR/coord_check.json: table, slopes and plot (SP vs muP)")
    p.add_argument("--lr-transfer", action="store_true",
                   help="best LR per arm and width with intervals, and the transfer penalty")
    p.add_argument("--optimizers", action="store_true",
                   help="best loss per optimizer (arm) and width, state bytes, tokens/s")
    p.set_defaults(fn=cmd_analyze)
    _add_config(sub)
    return parser


def _in_a_pod() -> bool:
    """This process is one of a pod's and not yet the guarded child (lm/parallel/guard.py)."""
    import os

    from lm.errors import ConfigError  # (lm.config would import JAX into the guard)
    from lm.parallel.distributed import detect
    from lm.parallel.guard import GUARDED
    if os.environ.get(GUARDED):
        from lm.parallel.guard import die_with_parent
        die_with_parent()
        return False
    try:
        return detect(os.environ) is not None
    except ConfigError:
        return False  # reported by the command's own start-up, one line


def main(argv: list[str] | None = None) -> int:
    full_argv = None if argv is None else list(argv)
    if argv is None:  # run as a program (not called from Python): host malloc first
        from lm.hostmem import reexec_with_host_malloc
        reexec_with_host_malloc(sys.argv[1:])
    argv, remote = _split_remote(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    args.remote = remote
    if args.command != "launch" and _in_a_pod():  # run it in a child that is watched
        from lm.parallel.guard import run_guarded
        return run_guarded(sys.argv[1:] if full_argv is None else full_argv)
    if args.command == "compile":
        # TPU topologies are compiled for from the host; never claim a local accelerator
        # (lm.compile.topology_devices then tells libtpu there is no TPU pod here).
        import os
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.command != "launch":
        from lm.compile import quiet_libtpu
        quiet_libtpu()  # libtpu (lmlab[tpu] or [test]) on a machine without TPUs: no noise
        from lm.hostmem import configure_jax
        configure_jax()
    from lm.parallel.distributed import exiting
    code = _run(args)
    exiting(code)  # peers of a pod that leave as well are no news now
    return code


def _run(args) -> int:
    from lm.config import ConfigError
    from lm.data import DataError
    try:
        if args.command != "launch":  # join the pod, if the environment describes one
            from lm.parallel.distributed import initialize_from_env
            initialize_from_env()
        return args.fn(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        full = find_disk_full(e)  # wherever it was written: one line, not a traceback
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return EXIT_DISK_FULL


if __name__ == "__main__":
    sys.exit(main())
