"""Smaller models from larger ones. distill.py: the `distill` config section and the
knowledge-distillation losses (logit KD at a temperature, forward or reverse KL);
teacher.py: the frozen teacher a distilling run restores and runs inside its step."""
