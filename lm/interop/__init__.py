"""Hugging Face interop: one record per model family (families/), the shared decoder's
config mapping (hf_config) and tensor table (hf_tensors), `lm import hf` (hf_import) and
`lm export hf` (hf_export, hf_peft)."""
