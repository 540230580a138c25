"""Instruction data (`data.format=instruction`): JSONL records with a prompt and a
response (`data.prompt_field`, `data.response_field`), or a chat `messages` list ending
with an assistant turn (rendered as role-tagged lines, "user: ...\nassistant: "; the
tokenizer's own chat template is not applied yet).

Each record becomes one document [BOS] + prompt + response + [EOS] whose per-token loss
weights are 1 on the response tokens and the final EOS, 0 on BOS and the prompt: the
packed rows' loss_mask then covers only what the model should learn to answer. Records
are packed like pretraining documents (lm/data/pipeline.py); the train/validation split
is the same deterministic hold-out by record position (lm/data/sources.py holdout)
unless data.validation_corpus names a file of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lm.data.errors import DataError
from lm.data.shards import TokenDocs
from lm.data.sources import corpus_files, holdout


def read_records(spec: str, key: str, prompt_field: str, response_field: str
                 ) -> list[tuple[str, str]]:
    """(prompt, response) pairs of every JSONL file named by `spec`, in order."""
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
                out.append(_pair(obj, path, n, prompt_field, response_field))
    if not out:
        raise DataError(f"{key}: {spec} holds no instruction records")
    return out


def _pair(obj, path: Path, n: int, prompt_field: str, response_field: str) -> tuple[str, str]:
    if isinstance(obj, dict) and "messages" in obj and prompt_field not in obj:
        return _from_messages(obj["messages"], path, n)
    if not isinstance(obj, dict) or prompt_field not in obj or response_field not in obj:
        raise DataError(f"data.prompt_field/response_field: {path} line {n} needs fields "
                        f"{prompt_field!r} and {response_field!r} (or a 'messages' list)")
    prompt, response = obj[prompt_field], obj[response_field]
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError(f"data.prompt_field/response_field: {path} line {n}: not strings")
    return prompt, response


def _from_messages(messages, path: Path, n: int) -> tuple[str, str]:
    """A chat as (everything before the last assistant turn, that turn), without a
    template: role-tagged lines."""
    if (not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
            or messages[-1].get("role") != "assistant"):
        raise DataError(f"data.corpus: {path} line {n}: 'messages' must be a list of "
                        "{role, content} ending with an assistant turn")
    head = "".join(f"{m.get('role')}: {m['content']}\n" for m in messages[:-1])
    return head + "assistant: ", messages[-1]["content"]


def tokenize_records(pairs: list[tuple[str, str]], tokenizer) -> TokenDocs:
    """Frame and tokenize (prompt, response) pairs into one shard with loss weights."""
    prompts = tokenizer.encode_batch([p for p, _ in pairs])
    responses = tokenizer.encode_batch([r for _, r in pairs])
    tokens, weights, lengths = [], [], []
    for p, r in zip(prompts, responses):
        doc = np.concatenate([[tokenizer.bos_id], p, r, [tokenizer.eos_id]]).astype(np.int32)
        w = np.concatenate([np.zeros(1 + len(p)), np.ones(len(r) + 1)]).astype(np.float32)
        tokens.append(doc)
        weights.append(w)
        lengths.append(len(doc))
    offsets = np.zeros(len(pairs) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenDocs((np.concatenate(tokens),), (offsets,), (np.concatenate(weights),))


def instruction_docs(cfg, tokenizer, split: str) -> TokenDocs:
    """The tokens and loss weights of one split of an instruction corpus."""
    if split == "validation" and cfg.validation_corpus:
        pairs = read_records(cfg.validation_corpus, "data.validation_corpus",
                             cfg.prompt_field, cfg.response_field)
    else:
        pairs = read_records(cfg.corpus, "data.corpus", cfg.prompt_field, cfg.response_field)
        if not cfg.validation_corpus:
            if len(pairs) < 2:
                raise DataError(f"data.corpus: {cfg.corpus} has one record: nothing to hold "
                                "out for validation (add records or set data.validation_corpus)")
            pairs = holdout(pairs, cfg.validation_fraction, split)
    return tokenize_records(pairs, tokenizer)
