"""The knob reference is generated from the field declarations: docs/config-reference.md
must be what `lm config --show --markdown` prints, and every knob declares a doc."""

from __future__ import annotations

from conftest import ROOT

from lm import config_reference, schema
from lm.config import TrainConfig

DOC = ROOT / "docs" / "config-reference.md"


def test_the_docs_reference_is_the_schema():
    assert DOC.read_text() == config_reference.markdown(), (
        "docs/config-reference.md disagrees with the field declarations; regenerate it: "
        "lm config --show --markdown > docs/config-reference.md")


def test_every_knob_declares_a_doc_and_the_reference_shows_it():
    missing = [key for key, e in schema.walk(TrainConfig) if not e.doc]
    assert not missing, f"knobs without a doc: {missing}"
    text = config_reference.text("model.attention")
    assert "model.attention.qkv_bias: bool = false" in text  # (the README's row lacked it)
    assert "model.attention.impl: auto | xla | pallas | cudnn" in text and "free_init" in text


def test_lm_config_show(lm_here):
    result = lm_here("config", "--show", "model.mamba2")
    assert result.returncode == 0, result.stderr
    assert "model.mamba2.scan_impl" in result.stdout and "model.d_model" not in result.stdout
    result = lm_here("config", "--show", "model.nothing")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown section" in result.stderr
