"""Launchers that start one `lm` command as a multi-process pod: `lm launch local`
(processes on this machine, simulated CPU devices), `lm launch tpu` (a Cloud TPU queued
resource), `lm launch slurm` (an sbatch job). Each process joins the pod through
lm/parallel/distributed.py."""
