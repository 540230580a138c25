"""`lm import hf PATH --run-dir DIR`: a local Hugging Face model directory (config.json,
*.safetensors, single or sharded with model.safetensors.index.json, tokenizer.json) ->
an lmlab run directory: config.json with the mapped model knobs, an orbax checkpoint at
step 0 (the train state: the weights, a fresh optimizer state), the tokenizer (with its
tokenizer_config.json / chat_template.jinja / generation_config.json where the source has
them; the special ids come from these files and config.json, checked to agree, and
the imported vocabulary never grows), and a
summary.json saying where it came from. `lm eval`, `lm sample`, `lm compile` and `lm
train --init-from` read it like any run.

Tensors stream to their shards: one tensor at a time is read (memory-mapped by
safetensors), converted to lmlab's layout and handed to jax.make_array_from_callback,
which copies to each local device only its shard of it. There is never a full host
copy of the model; a process of a pod reads only the slices its devices hold.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np

from lm import config as config_lib
from lm.config import ConfigError, DataConfig, TrainConfig
from lm.data.chat_template import CHAT_TEMPLATE_FILE
from lm.data.tokenizers import (GENERATION_CONFIG, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG,
                                 load_tokenizer)
from lm.interop.families import entries, model_config_from_hf
from lm.interop.hf_tensors import IGNORABLE_SUFFIXES
from lm.tree import get_path, set_path


def read_hf_config(path: Path) -> dict:
    file = path / "config.json"
    if not path.is_dir():
        raise ConfigError(f"lm import hf: {path} is not a directory")
    if not file.is_file():
        raise ConfigError(f"lm import hf: {path} has no config.json (not a Hugging Face "
                          "model directory)")
    try:
        hf = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"lm import hf: {file} is not readable JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"lm import hf: {file} is not a JSON object")
    return hf


class SafetensorsDir:
    """The tensors of an HF directory by name, from one file, a sharded set with an
    index, or several files without one. Files are opened once, lazily."""

    def __init__(self, path: Path):
        self._handles: dict = {}
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"lm import hf: {index} is not a safetensors index "
                                  f"({type(e).__name__}: {e})") from None
            self.file_of = {name: path / f for name, f in weight_map.items()}
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ConfigError(f"lm import hf: {path} holds no *.safetensors file "
                                  "(PyTorch .bin checkpoints are not read; convert them first)")
            self.file_of = {}
            for f in files:
                for name in self._open(f).keys():
                    self.file_of[name] = f

    def _open(self, file: Path):
        from safetensors import safe_open
        if file not in self._handles:
            if not file.is_file():
                raise ConfigError(f"lm import hf: {file} (named by the index) does not exist")
            try:
                handle = safe_open(str(file), framework="numpy")
            except Exception as e:  # noqa: BLE001 (a damaged file: one line)
                raise ConfigError(f"lm import hf: {file} is not a readable safetensors file "
                                  f"({e})") from None
            self._handles[file] = handle
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._open(self.file_of[name]).get_tensor(name)


def import_config(hf_dir: Path, run_dir: Path, name: str | None = None) -> TrainConfig:
    """The run config of an imported model: the mapped model, the directory's tokenizer
    (copied into the run dir), the default data and optimizer settings otherwise."""
    model = model_config_from_hf(read_hf_config(hf_dir))
    seq = min(DataConfig().seq_len, model.max_seq_len)
    return TrainConfig(model=model, data=DataConfig(tokenizer=str(run_dir.absolute() /
                                                                  "tokenizer.json"),
                                                    seq_len=seq),
                       name=name or hf_dir.absolute().name)


def load_params(hf_dir: Path, cfg: TrainConfig, pieces, prefix: tuple = ()) -> dict:
    """The HF weights as lmlab params, each array born sharded as the run shards it
    (`prefix`: where the model's params sit in the run's tree, e.g. a LoRA base)."""
    family = read_hf_config(hf_dir)["model_type"]
    tensors = SafetensorsDir(hf_dir)
    table = entries(cfg.model, family)
    abstract = get_path(pieces.abstract_state()["params"], prefix)
    shardings = get_path(pieces.state_shardings["params"], prefix)
    wanted = {n for e in table for n in e.hf_names}
    missing = [n for e in table for n in e.hf_names if n not in tensors.names()]
    if missing:
        raise ConfigError(f"lm import hf: tensor {missing[0]} is missing from {hf_dir} "
                          f"({len(missing)} missing)")
    extra = sorted(n for n in tensors.names() - wanted
                   if not n.endswith(IGNORABLE_SUFFIXES)
                   and not (n == "lm_head.weight" and cfg.model.tie_embeddings))
    if extra:
        raise ConfigError(f"lm import hf: tensor {extra[0]} in {hf_dir} has no place in the "
                          f"mapped model ({len(extra)} such tensor(s))")
    params: dict = {}
    for entry in table:
        target = get_path(abstract, entry.path)
        try:
            value = entry.to_lm([tensors.get(n) for n in entry.hf_names])
        except ValueError:  # a reshape that does not fit, experts of different shapes
            value = None
        if value is None or tuple(value.shape) != tuple(target.shape):
            shapes = ", ".join(f"{n} {list(tensors.shape(n))}" for n in entry.hf_names[:2])
            raise ConfigError(f"lm import hf: tensor {shapes} does not fit lmlab's "
                              f"{'/'.join(map(str, entry.path))} {list(target.shape)} "
                              "(config.json and the weights disagree)")
        value = np.asarray(value).astype(target.dtype)
        sharding = get_path(shardings, entry.path)
        set_path(params, entry.path, jax.make_array_from_callback(
            value.shape, sharding, lambda idx, v=value: v[idx]))
        del value  # this tensor's host copy goes now; only its shards stay on the devices
    return params


def save_state(run_dir: Path, state: dict, step: int = 0) -> None:
    """An orbax checkpoint holding only the train state (no data iterator: nothing was
    read yet), which restore_for_inference and --init-from read."""
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    manager.close()


# The tokenizer's files a run dir keeps beside its tokenizer.json, as in the HF dir: the
# special tokens (tokenizer_config.json or an older save's special_tokens_map.json:
# strings; generation_config.json: ids, the
# end-of-sequence ids generation stops at) that lm/data/tokenizers.py reads, and the chat
# template (chat_template.jinja, or tokenizer_config.json's chat_template), which
# instruction data of a run --init-from this one renders chats with.
TOKENIZER_FILES = ("tokenizer.json", TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE,
                   GENERATION_CONFIG)


def stage_tokenizer(hf_dir: Path, hf: dict, out: Path) -> Path:
    """The run's tokenizer files in `out`: the HF dir's, and where it has no
    generation_config.json, one with config.json's token ids (what transformers derives
    its generation config from), so the special ids are the model's own, never guessed
    by name. Returns out/tokenizer.json."""
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out / name)
    if not (out / GENERATION_CONFIG).is_file():
        ids = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if hf.get(k) is not None}
        if ids:
            (out / GENERATION_CONFIG).write_text(json.dumps(
                {"_from_model_config": True, **ids}, indent=2))
    return out / "tokenizer.json"


def check_special_tokens(hf: dict, declared: dict, vocab_size: int) -> None:
    """config.json's token ids against the tokenizer's own files (`declared`:
    lm.data.tokenizers.model_specials of the HF dir): in the model's vocabulary, and
    naming the same tokens as tokenizer_config.json (an EOS string that is not one of
    config.json's EOS ids is a tokenizer from another model)."""
    from lm.data.tokenizers import token_ids
    for role in ("bos", "eos", "pad"):
        key = f"{role}_token_id"
        try:
            ids = token_ids(hf.get(key))
        except (TypeError, ValueError):
            raise ConfigError(f"HF config.json: {key}={hf[key]!r} is not a token id "
                              "(or a list of them)") from None
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ConfigError(f"HF config.json: {key}={hf[key]!r} is outside the model's "
                              f"vocabulary (vocab_size={vocab_size})")
        token = declared["tokens"].get(role)
        if token is not None and ids and token[1] not in ids:
            value, i, source = token
            raise ConfigError(f"lm import hf: {source}'s {role}_token {value!r} is id {i}, "
                              f"but config.json's {key} is {hf[key]!r} (the tokenizer and "
                              "the model disagree)")


def check_run_dir(run_dir: Path, command: str = "hf") -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"lm import {command}: --run-dir {run_dir} exists and is not empty "
                          "(nothing is overwritten)")


def import_hf(hf_dir: str | Path, run_dir: str | Path, source: str | Path | None = None) -> int:
    """`source`: what summary.json and the last line name as the model's origin (a GGUF
    file `lm import gguf` turned into `hf_dir`), `hf_dir` itself by default."""
    import tempfile

    from lm.train.setup import setup_run

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    source = Path(source or hf_dir)
    check_run_dir(run_dir)
    cfg = import_config(hf_dir, run_dir, name=source.absolute().name)
    if not (hf_dir / "tokenizer.json").is_file():
        raise ConfigError(f"lm import hf: {hf_dir} has no tokenizer.json (lmlab reads Hugging "
                          "Face tokenizers from that file)")
    hf = read_hf_config(hf_dir)
    # The source's tokenizer files as they are (errors name them), then the run's,
    # staged: everything is checked before the run dir is made.
    check_special_tokens(hf, load_tokenizer(str(hf_dir / "tokenizer.json")).declared,
                         cfg.model.vocab_size)
    with tempfile.TemporaryDirectory(prefix="lm-import-") as staging:
        tok = stage_tokenizer(hf_dir, hf, Path(staging))
        probe = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tok)))
        setup = setup_run(probe)
        params = load_params(hf_dir, setup.cfg, setup.pieces)
        state = setup.pieces.fresh_state(params)
        run_dir.mkdir(parents=True, exist_ok=True)
        for file in sorted(Path(staging).iterdir()):
            shutil.copyfile(file, run_dir / file.name)
    (run_dir / "config.json").write_text(config_lib.to_json(cfg))
    save_state(run_dir, state)
    from lm.model import count_params
    counts = count_params(setup.cfg.model)
    (run_dir / "summary.json").write_text(json.dumps({
        "status": "imported", "source": str(source.absolute()), "steps": 0,
        "params": counts["total"], "non_embedding_params": counts["non_embedding"],
        "active_params": counts["active"]}, indent=2))
    print(f"imported {source} ({read_hf_config(hf_dir)['model_type']}, "
          f"{counts['total']:,} params) into {run_dir}")
    return 0
