"""`lm import hf`, `lm import gguf` and `lm export hf`: models in and out of other
formats."""

from __future__ import annotations

from lm.cli.command import Command


def import_arguments(p) -> None:
    p.add_argument("path", help="directory with config.json, *.safetensors, tokenizer.json")
    p.add_argument("--run-dir", required=True)


def import_hf(args) -> int:
    from lm.interop.hf_import import import_hf
    return import_hf(args.path, args.run_dir)


def import_gguf_arguments(p) -> None:
    p.add_argument("path", help="a llama.cpp .gguf file (Llama, Mistral, Qwen2, Qwen3)")
    p.add_argument("--run-dir", required=True)


def import_gguf(args) -> int:
    from lm.interop.gguf_import import import_gguf
    return import_gguf(args.path, args.run_dir)


def export_arguments(p) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True)
    p.add_argument("--peft", action="store_true",
                   help="a LoRA run as a PEFT adapter directory (default: merged weights)")
    p.add_argument("--family", default=None,
                   help="the Hugging Face model_type to write, e.g. phi3 (fused q/k/v and "
                        "gate/up projections) or helium (default: the first family that "
                        "expresses the model: llama before mistral, phi3, helium)")


def export_hf(args) -> int:
    from lm.interop.hf_export import export_hf
    return export_hf(args.run, args.out, peft=args.peft, family=args.family)


COMMANDS = [
    Command("import", "bring a model in from another format", subcommands=[
        Command("hf", "a local Hugging Face model directory -> an lmlab run directory",
                import_arguments, import_hf),
        Command("gguf", "a GGUF file (dequantized, tokenizer from its metadata) -> an lmlab "
                        "run directory", import_gguf_arguments, import_gguf)]),
    Command("export", "write a run's checkpoint in another format", subcommands=[
        Command("hf", "a run's latest checkpoint -> a Hugging Face model directory",
                export_arguments, export_hf)]),
]
