"""Post-training: preference optimisation (DPO, SimPO, ORPO: lm/post/preference.py, on
pairs from lm/post/pairs.py, the reference lm/post/reference.py) and RL with verifiable
rewards (GRPO: lm/post/grpo.py, the run lm/post/rl.py, tasks lm/post/rl_tasks.py)."""
