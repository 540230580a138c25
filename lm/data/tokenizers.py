"""Tokenizers behind one small interface.

Every tokenizer exposes:

- `vocab_size`: ids are in [0, vocab_size); the model's embedding table size.
- `bos_id`, `eos_id`, `pad_id`: always valid ids. A model's tokenizer (a tokenizer.json
  with its model's `tokenizer_config.json` or `generation_config.json` beside it) takes
  them from those files and never grows: a missing PAD is the EOS token, as transformers
  pads such models. A bare tokenizer file that lacks one of them gets it guessed by name
  or appended after its own vocabulary (and `vocab_size` grows), so the pipeline can
  always separate documents and pad rows.
- `frame_prefix`, `frame_suffix`: the ids the tokenizer itself puts around one text
  (a tokenizer.json's post-processor: Llama-3's TemplateProcessing adds BOS, Qwen's and
  GPT-2's add nothing; lmlab's byte tokenizer, SentencePiece models and a bare
  tokenizer.json without a post-processor or model files: BOS first), and
  `frame(ids)`, which applies them: what `lm sample`, evaluation prompts and training
  documents put around a text, so text is framed as the model was trained to see it.
- `stop_ids`: the ids that end a generation (generation_config.json's `eos_token_id`,
  which may list several; else `eos_id`).
- `encode(text) -> int32 array` (no special tokens added) and
  `decode(ids) -> str` (special tokens skipped, invalid UTF-8 replaced).
- `token_bytes`: int32 [vocab_size], how many UTF-8 bytes of text each token stands
  for (0 for specials). The trainer divides summed NLL by these to report
  bits-per-byte, which is comparable across tokenizers. It is exact for the byte
  tokenizer; for subword models it is the byte length of the token's surface
  string (SentencePiece's "▁" counts as one space, so the dummy-prefix space of a
  document's first word is counted; decoder-inserted spaces, e.g. between
  WordLevel words, are not), which is within a few percent of the true count.
- `spec`: the string it was loaded from ("byte" or an absolute path), recorded in
  prepared datasets so a mismatch can be detected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lm.data.errors import DataError


class Tokenizer:
    """Base class; subclasses set the attributes in __init__."""

    spec: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    token_bytes: np.ndarray
    frame_prefix: tuple[int, ...] = ()
    frame_suffix: tuple[int, ...] = ()
    stop_ids: tuple[int, ...] = ()

    def frame(self, ids: Iterable[int]) -> np.ndarray:
        """`ids` (one text's, as `encode` gives them) with the tokenizer's own framing."""
        return np.concatenate([np.asarray(self.frame_prefix, np.int32),
                               np.asarray(ids, np.int32).reshape(-1),
                               np.asarray(self.frame_suffix, np.int32)])

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def cache_key(self) -> tuple:
        """Identifies this tokenizer's behaviour (for in-memory caches).

        File-based tokenizers include the file's mtime so an edited model file is
        never served stale tokens.
        """
        if self.spec == "byte":
            return ("byte",)
        try:
            mtime = os.stat(self.spec).st_mtime_ns
        except OSError:
            mtime = 0
        return (type(self).__name__, self.spec, mtime)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are the tokens: ids 0..255, then BOS=256, EOS=257, PAD=258."""

    def __init__(self):
        self.spec = "byte"
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258
        self.vocab_size = 259
        self.frame_prefix, self.stop_ids = (self.bos_id,), (self.eos_id,)
        self.token_bytes = np.zeros(self.vocab_size, np.int32)
        self.token_bytes[:256] = 1

    def encode(self, text: str) -> np.ndarray:
        # One C-level copy; no per-character Python work.
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        a = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
        a = a[(a >= 0) & (a < 256)].astype(np.uint8)
        return a.tobytes().decode("utf-8", errors="replace")


def _add_missing_specials(tok: Tokenizer, base_vocab: int, bos: int, eos: int, pad: int) -> None:
    """Set bos/eos/pad ids, appending ids after the model vocab for missing ones (-1)."""
    nxt = base_vocab
    ids = []
    for i in (bos, eos, pad):
        if i is None or i < 0:
            i, nxt = nxt, nxt + 1
        ids.append(i)
    tok.bos_id, tok.eos_id, tok.pad_id = ids
    tok.vocab_size = nxt


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        path = Path(path)
        self.spec = str(path.resolve())
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError variously
            raise DataError(f"data.tokenizer: cannot load SentencePiece model {path}: {e}") from None
        n = self.sp.get_piece_size()
        self.base_vocab = n
        _add_missing_specials(self, n, self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id())
        # A .model file has no post-processor; HF's Llama/SentencePiece tokenizers add BOS.
        self.frame_prefix, self.stop_ids = (self.bos_id,), (self.eos_id,)
        tb = np.zeros(self.vocab_size, np.int32)
        for i in range(n):
            if self.sp.is_control(i):
                continue
            if self.sp.is_byte(i):
                tb[i] = 1  # byte-fallback piece <0xNN>
            elif self.sp.is_unknown(i):
                tb[i] = 1  # unknown span: count one byte (a lower bound)
            else:
                tb[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        self.token_bytes = tb
        self._special = {self.bos_id, self.eos_id, self.pad_id}

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text, out_type=int), np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(x, np.int32) for x in self.sp.encode(list(texts), out_type=int)]

    def decode(self, ids: Iterable[int]) -> str:
        keep = [int(i) for i in np.asarray(ids).reshape(-1)
                if 0 <= i < self.base_vocab and int(i) not in self._special
                and not self.sp.is_control(int(i))]
        return self.sp.decode(keep)


# Conventional spellings of special tokens, most specific first. GPT-2-style
# vocabularies have only <|endoftext|>, which then serves as both BOS and EOS.
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]", "<|endoftext|>")
_EOS_NAMES = ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[EOS]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable char -> the byte it encodes."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, via the `tokenizers` library."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _HF

        path = Path(path)
        self.spec = str(path.resolve())
        try:
            self.tok = _HF.from_file(str(path))
        except Exception as e:
            raise DataError(f"data.tokenizer: cannot load tokenizer.json {path}: {e}") from None
        n = self.tok.get_vocab_size(with_added_tokens=True)
        self.base_vocab = n
        vocab = self.tok.get_vocab(with_added_tokens=True)

        def find(names):
            return next((vocab[t] for t in names if t in vocab), -1)

        self.declared = model_specials(path.parent, vocab)
        roles = {"bos": _BOS_NAMES, "eos": _EOS_NAMES, "pad": _PAD_NAMES}
        if self.declared["files"]:
            # The model's own files speak for it, not token names, and an imported
            # vocabulary never grows. No PAD: the EOS token pads (padding is masked out of
            # the loss); no BOS (Qwen, GPT-2 styles): EOS separates documents, as in their
            # pretraining. Only an EOS the files leave out is looked up by name.
            eos = self.declared.get("eos", find(_EOS_NAMES))
            eos = eos if eos >= 0 else self.declared.get("bos", -1)
            ids = {"eos": eos, "bos": self.declared.get("bos", eos),
                   "pad": self.declared.get("pad", eos)}
        else:
            ids = {r: find(names) for r, names in roles.items()}
        _add_missing_specials(self, n, ids["bos"], ids["eos"], ids["pad"])
        specials = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self._special = specials | {self.bos_id, self.eos_id, self.pad_id}
        self.stop_ids = tuple(self.declared.get("stop", (self.eos_id,)))
        self.frame_prefix, self.frame_suffix = self._post_processor_frame()
        self.token_bytes = self._token_bytes(vocab)

    @property
    def cache_key(self) -> tuple:
        """The tokenizer.json's and its model files' (which pick the special ids) mtimes."""
        folder = Path(self.spec).parent
        stamps = []
        for name in (TOKENIZER_CONFIG, GENERATION_CONFIG, SPECIAL_TOKENS_MAP):
            try:
                stamps.append(os.stat(folder / name).st_mtime_ns)
            except OSError:
                stamps.append(0)
        return super().cache_key + tuple(stamps)

    def _post_processor_frame(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """What tokenizer.json's post-processor puts around a single text: the ids of a
        probe encoded with special tokens, less those encoded without. A model's
        tokenizer without a post-processor frames nothing (Qwen, as transformers
        tokenizes); a bare tokenizer.json without one (no model files beside it, e.g.
        one trained for lmlab) keeps lmlab's convention, BOS first."""
        if self.tok.post_processor is None and not self.declared["files"]:
            return (self.bos_id,), ()
        probe = "Frame me, 12 ok."
        bare = self.tok.encode(probe, add_special_tokens=False).ids
        full = self.tok.encode(probe, add_special_tokens=True).ids
        for i in range(len(full) - len(bare) + 1):
            if full[i:i + len(bare)] == bare:
                return tuple(full[:i]), tuple(full[i + len(bare):])
        raise DataError(f"data.tokenizer: {self.spec}'s post-processor rewrites the text's "
                        "tokens (not only special tokens around them); lmlab cannot frame it")

    def _token_bytes(self, vocab: dict[str, int]) -> np.ndarray:
        cfg = json.loads(self.tok.to_str())

        def has_type(node, name) -> bool:
            # pre_tokenizer/decoder may be a single component or a Sequence of them.
            if isinstance(node, dict):
                return node.get("type") == name or any(has_type(v, name) for v in node.values())
            if isinstance(node, list):
                return any(has_type(v, name) for v in node)
            return False

        byte_level = has_type(cfg.get("decoder"), "ByteLevel") or has_type(
            cfg.get("pre_tokenizer"), "ByteLevel")
        b2u = _bytes_to_unicode() if byte_level else {}
        prefix = (cfg.get("model") or {}).get("continuing_subword_prefix") or ""
        tb = np.zeros(self.vocab_size, np.int32)
        for piece, i in vocab.items():
            if i in self._special or i >= self.vocab_size:
                continue
            if byte_level and all(c in b2u for c in piece):
                tb[i] = len(piece)  # each char of a byte-level token is one byte
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                tb[i] = 1  # byte-fallback token
            else:
                if prefix and piece.startswith(prefix) and len(piece) > len(prefix):
                    piece = piece[len(prefix):]
                tb[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return tb

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = self.tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in out]

    def decode(self, ids: Iterable[int]) -> str:
        keep = [int(i) for i in np.asarray(ids).reshape(-1)
                if 0 <= i < self.base_vocab and int(i) not in self._special]
        return self.tok.decode(keep, skip_special_tokens=True)


# The files a model's directory keeps beside tokenizer.json that say which ids are special.
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"data.tokenizer: {file} is not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise DataError(f"data.tokenizer: {file} is not a JSON object")
    return value


def token_ids(value) -> list[int]:
    """A config's token id field (an int, a list of them, or null) as a list."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def model_specials(folder: Path, vocab: dict[str, int]) -> dict:
    """The special ids a model's own files beside its tokenizer.json declare:
    tokenizer_config.json's `bos_token` / `eos_token` / `pad_token` (strings or AddedToken
    objects; what transformers' tokenizer uses; older saves keep them in
    special_tokens_map.json) and, for roles it leaves out,
    generation_config.json's `bos_token_id` / `eos_token_id` / `pad_token_id` (what
    transformers' generate uses). Returns {"bos"/"eos"/"pad": id} for the roles declared,
    "stop": generation_config's end-of-sequence ids (a list there may name several),
    "files": which of these files exist, and "tokens": {role: (string, id, file name)} as
    the token files name them (for the importer's agreement check). A token string the
    vocabulary lacks, or two files that disagree, is one line."""
    out: dict = {"files": [], "tokens": {}}
    named: dict = {}  # "eos_token" -> (its value, the file saying so)
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):  # tokenizer_config.json wins
        if (folder / name).is_file():
            out["files"].append(name)
            named.update({k: (v, name) for k, v in _read_json(folder / name).items()
                          if k.endswith("_token")})
    for role in ("bos", "eos", "pad"):
        value, source = named.get(f"{role}_token", (None, None))
        if isinstance(value, dict):  # an AddedToken: {"content": "<s>", ...}
            value = value.get("content")
        if value is None:
            continue
        if not isinstance(value, str) or value not in vocab:
            raise DataError(f"data.tokenizer: {folder / source}: {role}_token={value!r} is "
                            "not a token of tokenizer.json")
        out[role] = vocab[value]
        out["tokens"][role] = (value, vocab[value], source)
    generation_file = folder / GENERATION_CONFIG
    if generation_file.is_file():
        out["files"].append(GENERATION_CONFIG)
        generation = _read_json(generation_file)
        for role in ("bos", "eos", "pad"):
            ids = token_ids(generation.get(f"{role}_token_id"))
            if role in out["tokens"] and ids and out[role] not in ids:
                value, i, source = out["tokens"][role]
                raise DataError(f"data.tokenizer: {folder / source}'s {role}_token {value!r} "
                                f"(id {i}) contradicts {generation_file}'s {role}_token_id="
                                f"{ids}")
            if ids and role not in out:
                out[role] = ids[0]
            if role == "eos" and ids:
                out["stop"] = ids
    return out


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte" | path to a SentencePiece `.model` | path to a HF `tokenizer.json`."""
    spec = (spec or "").strip()
    if spec == "byte":
        return ByteTokenizer()
    if spec.endswith(".model") or spec.endswith(".json"):
        if not Path(spec).is_file():
            raise DataError(f"data.tokenizer: no such file: {spec}")
        return SentencePieceTokenizer(spec) if spec.endswith(".model") else HFTokenizer(spec)
    raise DataError(
        f"data.tokenizer: unrecognised tokenizer {spec!r} "
        "(expected 'byte', a SentencePiece .model file or a tokenizer.json file)")


__all__ = ["Tokenizer", "ByteTokenizer", "SentencePieceTokenizer", "HFTokenizer", "load_tokenizer",
           "model_specials", "token_ids", "TOKENIZER_CONFIG", "GENERATION_CONFIG",
           "SPECIAL_TOKENS_MAP"]
