"""Hugging Face interop: config mapping (hf_config), the tensor table (hf_tensors),
`lm import hf` (hf_import) and `lm export hf` (hf_export)."""
