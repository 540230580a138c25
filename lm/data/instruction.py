"""Instruction data (`data.format=instruction`): JSONL records with a prompt and a
response (`data.prompt_field`, `data.response_field`), or a chat `messages` list of
{role, content} ending with an assistant turn.

A prompt/response record becomes one document prompt + response framed as the tokenizer
frames a text (`Tokenizer.frame`: [BOS] first for the byte tokenizer, a model
tokenizer.json's post-processor otherwise), then [EOS], whose per-token loss weights are
1 on the response tokens and the final EOS, 0 on the frame's prefix and the prompt. A
chat is rendered with the tokenizer's chat template where it has one
(lm/data/chat_template.py): the document is the template's text and nothing else (no
BOS/EOS of ours; see `tokenize_records`), with loss on every assistant turn as the
template emits it (content and end-of-turn token). Without a template a chat is
role-tagged lines, "user: ...\nassistant: ", framed like a prompt/response pair, the
last assistant message being the response. The packed rows' loss_mask then covers only
what the model should learn to answer. Records are packed like pretraining documents
(lm/data/pipeline.py); the train/validation split is the same deterministic hold-out by
record position (lm/data/sources.py holdout) unless data.validation_corpus names a file
of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm.data.errors import DataError
from lm.data.shards import TokenDocs
from lm.data.sources import corpus_files, holdout


@dataclass(frozen=True)
class Chat:
    """A chat `messages` record, checked ({role, content} strings, ending with an
    assistant turn), and where it came from (for error lines)."""
    messages: tuple[dict, ...]
    where: str


def read_records(spec: str, key: str, prompt_field: str, response_field: str
                 ) -> list[tuple[str, str] | Chat]:
    """(prompt, response) pairs and chats of every JSONL file named by `spec`, in order."""
    out = []
    for path in corpus_files(spec, key):
        if not path.name.endswith((".jsonl", ".ndjson")):
            raise DataError(f"{key}: {path.name}: instruction data must be JSONL")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{key}: {path} line {n} is not JSON ({e})") from None
                out.append(_record(obj, f"{key}: {path} line {n}", path, n, prompt_field,
                                   response_field))
    if not out:
        raise DataError(f"{key}: {spec} holds no instruction records")
    return out


def _record(obj, where: str, path: Path, n: int, prompt_field: str, response_field: str
            ) -> tuple[str, str] | Chat:
    if isinstance(obj, dict) and "messages" in obj and prompt_field not in obj:
        return _chat(obj["messages"], where)
    if not isinstance(obj, dict) or prompt_field not in obj or response_field not in obj:
        raise DataError(f"data.prompt_field/response_field: {path} line {n} needs fields "
                        f"{prompt_field!r} and {response_field!r} (or a 'messages' list)")
    prompt, response = obj[prompt_field], obj[response_field]
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError(f"data.prompt_field/response_field: {path} line {n}: not strings")
    return prompt, response


def _chat(messages, where: str) -> Chat:
    if (not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages)
            or messages[-1]["role"] != "assistant"):
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}} strings "
                        "ending with an assistant turn")
    # As transformers does: keys whose value is null are dropped (templates test for a
    # key's presence, e.g. tool_calls, and would render a literal None).
    return Chat(tuple({k: v for k, v in m.items() if v is not None} for m in messages), where)


def role_tagged(chat: Chat) -> tuple[str, str]:
    """A chat without a template: (everything before the last assistant turn as
    role-tagged lines, that turn)."""
    head = "".join(f"{m['role']}: {m['content']}\n" for m in chat.messages[:-1])
    return head + "assistant: ", chat.messages[-1]["content"]


def tokenize_records(records: list[tuple[str, str] | Chat], tokenizer,
                     template=None, last_turn_only: bool = False) -> TokenDocs:
    """Frame and tokenize records into one shard with loss weights.

    Each document is a list of (text, learned) segments, tokenized separately (so the
    mask falls on token boundaries; the template's turn boundaries are special tokens
    or newlines, where tokenizing the whole text would split anyway). A pair (or a chat
    without a template) is framed as the tokenizer frames a text (`Tokenizer.frame`:
    [BOS] first for the byte tokenizer, a tokenizer.json's post-processor otherwise)
    around prompt + response, then EOS (learned: it ends the response). A chat rendered by a
    template is its text only, as transformers tokenizes apply_chat_template's output
    (add_special_tokens=False): a template that wants a BOS writes {{ bos_token }}
    itself (Llama-3) and one that does not gets none (Qwen2's ChatML); adding ours too
    would double it. Our encode never adds special tokens (the tokenizer.json's
    post-processor BOS is off), and the end-of-turn token the template emits closes the
    assistant turn, so no EOS is appended either.

    last_turn_only: a chat's earlier assistant turns are context, not learned (the
    completions of preference pairs, lm/post/pairs.py).
    """
    docs: list[tuple[list[tuple[str, bool]], bool]] = []  # (segments, framed)
    for r in records:
        if isinstance(r, Chat) and template is not None:
            segs = template.segments(list(r.messages), r.where)
            if last_turn_only:
                last = max(i for i, (_, learned) in enumerate(segs) if learned)
                segs = [(t, learned and i == last) for i, (t, learned) in enumerate(segs)]
            docs.append((segs, False))
        else:
            prompt, response = role_tagged(r) if isinstance(r, Chat) else r
            docs.append(([(prompt, False), (response, True)], True))
    texts = [t for segs, _ in docs for t, _ in segs]
    encoded = iter(tokenizer.encode_batch(texts) if texts else [])
    tokens, weights, lengths = [], [], []
    for segs, framed in docs:
        ids, w = [], []
        if framed:
            ids.append(np.asarray(tokenizer.frame_prefix, np.int32))
            w.append(np.zeros(len(tokenizer.frame_prefix), np.float32))
        for _, learned in segs:
            seg = np.asarray(next(encoded), np.int32)
            ids.append(seg)
            w.append(np.full(len(seg), 1.0 if learned else 0.0, np.float32))
        if framed:
            suffix = list(tokenizer.frame_suffix)
            if not suffix or suffix[-1] != tokenizer.eos_id:
                suffix.append(tokenizer.eos_id)
            ids.append(np.asarray(suffix, np.int32))
            w.append(np.ones(len(suffix), np.float32))
        doc = np.concatenate(ids)
        tokens.append(doc)
        weights.append(np.concatenate(w))
        lengths.append(len(doc))
    offsets = np.zeros(len(records) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenDocs((np.concatenate(tokens),), (offsets,), (np.concatenate(weights),))


def instruction_docs(cfg, tokenizer, split: str) -> TokenDocs:
    """The tokens and loss weights of one split of an instruction corpus."""
    from lm.data.chat_template import find_chat_template
    if split == "validation" and cfg.validation_corpus:
        records = read_records(cfg.validation_corpus, "data.validation_corpus",
                               cfg.prompt_field, cfg.response_field)
    else:
        records = read_records(cfg.corpus, "data.corpus", cfg.prompt_field, cfg.response_field)
        if not cfg.validation_corpus:
            if len(records) < 2:
                raise DataError(f"data.corpus: {cfg.corpus} has one record: nothing to hold "
                                "out for validation (add records or set data.validation_corpus)")
            records = holdout(records, cfg.validation_fraction, split)
    template = (find_chat_template(tokenizer)
                if any(isinstance(r, Chat) for r in records) else None)
    return tokenize_records(records, tokenizer, template)
