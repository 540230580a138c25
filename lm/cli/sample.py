"""`lm sample`: generate text from a run's latest checkpoint."""

from __future__ import annotations

import sys

from lm.cli.command import Command, overrides_option, run_option


def arguments(p) -> None:
    run_option(p)
    p.add_argument("--prompt", default="")
    p.add_argument("--chat", metavar="MESSAGE",
                   help="a user message rendered with the model's chat template (and its "
                        "generation prompt); prints only the reply, which ends at the "
                        "template's end of turn")
    p.add_argument("--system", metavar="TEXT", help="a system message before --chat's")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    overrides_option(p, "eval-time model knob (as for lm eval), e.g. --set "
                        "model.max_seq_len=1024 --set model.attention.window=128")


def check_sampling_flags(args) -> None:
    """Refuse values that would sample nonsense (a negative temperature flips the
    distribution, top-p > 1 or top-k < 0 silently mean "off") before a run is read."""
    from lm.errors import ConfigError
    for flag, value, ok, want in (
            ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
            ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0 = greedy)"),
            ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0 = off)"),
            ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1] (1 = off)"),
            ("--num-samples", args.num_samples, args.num_samples >= 1, ">= 1")):
        if not ok:  # (NaN fails every comparison)
            raise ConfigError(f"lm sample {flag} must be {want}, got {value}")
    if args.chat is not None and args.prompt:
        raise ConfigError("lm sample --chat and --prompt exclude each other (the chat "
                          "template writes the whole prompt)")
    if args.system is not None and args.chat is None:
        raise ConfigError("lm sample --system needs --chat")


def prompt_of(args, tokenizer) -> tuple[list[int], tuple[int, ...], str]:
    """(Prompt ids, stop ids, the text printed before the generated text) of --prompt or
    --chat. A prompt is framed as the model's tokenizer frames a text (an imported Qwen or
    GPT-2 style tokenizer adds no BOS, Llama-3's does), as transformers'
    tokenizer(prompt) does, and printed with its continuation; an empty one that such a
    tokenizer frames as nothing starts from its BOS (for GPT-2 / Qwen, the <|endoftext|>
    that precedes every document they were trained on). A chat is the conversation
    through the chat template (transformers' apply_chat_template + generate), and only
    the reply is printed."""
    from lm.errors import ConfigError
    if args.chat is None:
        prompt = [int(i) for i in tokenizer.frame(tokenizer.encode(args.prompt))]
        return prompt or [tokenizer.bos_id], tokenizer.stop_ids, args.prompt
    from lm.data.chat_template import chat_prompt, find_chat_template
    template = find_chat_template(tokenizer)
    if template is None:
        raise ConfigError(f"lm sample --chat: the run's tokenizer ({tokenizer.spec}) has no "
                          "chat template (chat_template.jinja or tokenizer_config.json's "
                          "chat_template beside its tokenizer.json)")
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    messages.append({"role": "user", "content": args.chat})
    ids, stops = chat_prompt(tokenizer, template, messages, "lm sample --chat")
    return ids, stops, ""


def sample(args) -> int:
    from lm.evals.overrides import check_keys, eval_time_graphdef
    from lm.sample import complete
    from lm.train.param_source import restore_for_inference
    check_sampling_flags(args)
    check_keys(args.overrides)
    run, params, step = restore_for_inference(args.run)
    tokenizer = run.tokenizer
    prompt, stops, shown = prompt_of(args, tokenizer)
    print(f"sampling from {args.run} at checkpoint step {step}", file=sys.stderr, flush=True)
    # Eval-time knobs (a Λ mask, RoPE scaling, a longer max_seq_len = a longer KV cache).
    # The batched engine generates (one request, --num-samples samples); a generation
    # beyond max_seq_len slides the loop's window instead (lm.sample.complete).
    graphdef, cfg = eval_time_graphdef(run, args.overrides)
    outs = complete(graphdef, params, prompt, args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, num_samples=args.num_samples,
                    max_seq_len=cfg.model.max_seq_len, stop_ids=stops)
    for i, ids in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(shown + tokenizer.decode(ids))
    return 0


COMMANDS = [Command("sample", "generate text from a run's latest checkpoint", arguments, sample)]
