"""Post-training: preference objectives (DPO family) and RL with verifiable rewards (GRPO)."""
