"""Evaluations of a trained run beyond the validation loss: loss by sequence length and
position (`lengths`), passkey retrieval (`passkey`); `overrides` holds the model knobs
that may change at evaluation time (attention window / sinks, RoPE scaling)."""
