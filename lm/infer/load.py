"""An engine over a run's latest checkpoint, and its prompts framed as `lm sample` frames
them: what `lm generate` and `lm serve` share (lm/cli/generate.py, lm/infer/server.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lm.data.chat_template import ChatTemplate, chat_prompt, find_chat_template
from lm.evals.overrides import check_keys, eval_time_graphdef
from lm.infer.engine import Engine
from lm.train.param_source import restore_for_inference


@dataclass
class Loaded:
    """A run's engine, tokenizer and (where asked for and present) chat template."""
    run: Any  # lm.train.setup.RunSetup
    step: int  # the checkpoint's
    tokenizer: Any
    engine: Engine
    template: ChatTemplate | None = None

    def prompt(self, text: str) -> tuple[list[int], tuple[int, ...]]:
        """(ids, stop ids) of a text prompt: framed as `lm sample --prompt` frames it (the
        tokenizer's BOS where it adds one; BOS alone for an empty text)."""
        tok = self.tokenizer
        ids = [int(t) for t in tok.frame(tok.encode(text))]
        return ids or [tok.bos_id], tuple(tok.stop_ids)

    def chat(self, messages: list[dict], where: str) -> tuple[list[int], tuple[int, ...]]:
        """(ids, stop ids) of a conversation rendered with the chat template and its
        generation prompt (lm.data.chat_template.chat_prompt: the reply ends at the
        template's end of turn). Needs `template`."""
        assert self.template is not None
        ids, stops = chat_prompt(self.tokenizer, self.template, messages, where)
        return ids, tuple(stops)


def load_engine(run_dir: str, overrides: list[str], *, slots: int, pages: int,
                page_size: int, chat: bool = False, options: dict | None = None) -> Loaded:
    """The engine over `run_dir`'s latest checkpoint with eval-time `overrides` (--set):
    `slots` sequences, `pages` K/V pages of `page_size` tokens (0 = enough for `slots`
    sequences of the model's max_seq_len), decoding with the run's tokenizer. `chat`:
    look for the tokenizer's chat template too (None where it has none). `options`: more
    Engine kwargs (packing, prefix sharing, Hydragen)."""
    check_keys(overrides)
    run, params, step = restore_for_inference(run_dir)
    tokenizer = run.tokenizer
    template = find_chat_template(tokenizer) if chat else None
    graphdef, cfg = eval_time_graphdef(run, overrides)
    max_len = cfg.model.max_seq_len
    pages = pages or slots * -(-max_len // page_size) + 1
    engine = Engine(graphdef, params, slots=slots, pages=pages, page_size=page_size,
                    max_seq_len=max_len, decode=lambda ids: tokenizer.decode(ids),
                    **(options or {}))
    return Loaded(run, step, tokenizer, engine, template)
