"""Post-training objectives: preference optimisation (DPO, SimPO, ORPO:
lm/post/preference.py, on pairs from lm/post/pairs.py)."""
