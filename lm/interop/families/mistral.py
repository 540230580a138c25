"""Mistral (MistralForCausalLM): Llama with a sliding attention window
(config.json sliding_window: the window, or null)."""

from lm.interop.families import Family, register

MISTRAL = register(Family(
    model_type="mistral", architecture="MistralForCausalLM", window="always",
))
