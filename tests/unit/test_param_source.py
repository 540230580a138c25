"""Where a run's first weights come from (lm/train/param_source.py): the source types,
their serialized form (lora_base.json), their checks, and the import graph around them."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from lm.config import ConfigError
from lm.train.param_source import (HFDirectory, RunCheckpoint, SeedInit, fingerprint,
                                   from_init_from, from_json)

ROOT = Path(__file__).resolve().parents[2]


def test_lora_base_json_as_77d21ee_wrote_it_reads_back_and_writes_the_same():
    """The three forms lora_base.json took before ParamSource existed (lm/peft/base_ref.py
    at 77d21ee) read as sources and write back unchanged, key order included."""
    files = [{"name": "model.safetensors", "bytes": 123, "sample_sha256": "ab" * 32}]
    written = [{"kind": "init", "seed": 3},
               {"kind": "run", "path": "/somewhere/base", "step": 12},
               {"kind": "hf", "path": "/somewhere/hf", "files": files}]
    sources = [from_json(json.loads(json.dumps(w, indent=2))) for w in written]
    assert sources == [SeedInit(3), RunCheckpoint(Path("/somewhere/base"), 12),
                       HFDirectory(Path("/somewhere/hf"), tuple(files))]
    for w, s in zip(written, sources):
        assert json.dumps(s.to_json(), indent=2) == json.dumps(w, indent=2)
    assert [s.describe() for s in sources] == [
        "the init of seed 3", "checkpoint step 12 of /somewhere/base",
        "the Hugging Face dir /somewhere/hf"]
    with pytest.raises(ConfigError, match="unknown kind of base 'gguf'"):
        from_json({"kind": "gguf", "path": "/x"})


def test_init_from_names_a_run_or_a_hugging_face_dir(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": {}}))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert from_init_from(str(tmp_path / "run")) == RunCheckpoint(tmp_path / "run")
    assert from_init_from(str(tmp_path / "hf")) == HFDirectory(tmp_path / "hf")
    with pytest.raises(ConfigError, match="no config.json there"):
        from_init_from(str(tmp_path / "nothing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="config.json is not readable JSON"):
        from_init_from(str(tmp_path / "bad"))


def test_a_pinned_source_checks_it_is_still_there_and_unchanged(tmp_path):
    from safetensors.numpy import save_file
    import numpy as np
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"w": np.arange(6, dtype=np.float32)}, str(hf / "model.safetensors"))
    pinned = HFDirectory(hf, tuple(fingerprint(hf)))
    pinned.check()
    HFDirectory(tmp_path / "gone").check()  # not pinned: nothing to compare yet
    save_file({"w": np.arange(6, dtype=np.float32) * 2}, str(hf / "model.safetensors"))
    with pytest.raises(ConfigError, match="model.safetensors changed since the run started"):
        pinned.check()
    save_file({"w": np.arange(6, dtype=np.float32)}, str(hf / "model.safetensors"))
    save_file({"v": np.zeros(2, np.float32)}, str(hf / "more.safetensors"))
    with pytest.raises(ConfigError, match="holds safetensors files it did not hold"):
        pinned.check()
    with pytest.raises(ConfigError, match=f"the Hugging Face dir {tmp_path / 'gone'} is gone"):
        HFDirectory(tmp_path / "gone", ()).check()

    run = tmp_path / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    RunCheckpoint(run, 4).check()
    with pytest.raises(ConfigError, match=f"checkpoint step 8 of {run} is gone"):
        RunCheckpoint(run, 8).check()
    with pytest.raises(ConfigError, match=f"the run {tmp_path / 'moved'} is gone"):
        RunCheckpoint(tmp_path / "moved", 4).check()


def _imports(module_file: Path, module: str) -> set[tuple[str, str]]:
    """(imported module, name) pairs of a module, module-level and inside functions."""
    out = set()
    for node in ast.walk(ast.parse(module_file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {(node.module, a.name) for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {(a.name, "") for a in node.names}
    return out


def test_the_weight_sources_modules_import_no_cycle_and_no_private_name():
    """lm/train/param_source.py sits above setup, state, checkpoint and the HF reader:
    none of those imports it (no circle), and no module imports another's private names
    from it or from them."""
    below = ["lm.train.setup", "lm.train.state", "lm.train.checkpoint",
             "lm.interop.hf_import", "lm.interop.hf_config", "lm.peft", "lm.peft.lora"]
    files = {m: ROOT / (m.replace(".", "/") + ".py") for m in below}
    files["lm.peft"] = ROOT / "lm" / "peft" / "__init__.py"
    for m, f in files.items():
        imported = {mod for mod, _ in _imports(f, m)}
        assert "lm.train.param_source" not in imported, m
    for f in (ROOT / "lm").rglob("*.py"):
        for mod, name in _imports(f, ""):
            if mod in {"lm.train.param_source", *below}:
                assert not (name.startswith("_") and not name.startswith("__")), (f, mod, name)
