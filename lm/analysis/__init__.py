"""Analysis of finished runs: load a sweep, fit scaling laws, measure LR sensitivity.

    results    load(workdir) -> one row per run (task scores as tasks/<task>/<metric>);
               metrics(run_dir) -> metrics.jsonl; task_scores(run_dir) -> its newest
               evals/tasks-step*.json; load_sweep(workdir) adds the sweep's tags and axes
    scaling    Chinchilla approach 2 (IsoFLOP parabolas) and approach 3 (parametric law,
               Huber fit, bootstrap), compute-optimal allocation, plots
    stability  Wortsman et al. (2023) LR sensitivity, attention-logit / log Z curves, plots
    task_scaling  two-step task scaling law (task loss of compute, accuracy of task loss),
               bootstrap intervals, the held-out run's prediction, plot
    seeds      intervals over seeds, paired differences between arms, noise floors
    moe, transfer, coord_check   MoE load balance, LR transfer across width, muP checks
    analyses   `lm analyze`: each analysis registered with when it applies
    table      `lm results`: the table of a sweep's runs

The modules are imported explicitly (``from lm.analysis import scaling``) so that using
one does not pull in the others' dependencies (pandas, matplotlib) and nothing here
imports jax: analysis runs on a laptop next to a bucket of results.
"""


def load(workdir):
    """One pandas DataFrame row per run under `workdir` (see `results.load`)."""
    from lm.analysis import results
    return results.load(workdir)


def metrics(run_dir):
    """A run's metrics.jsonl as a DataFrame (see `results.metrics`)."""
    from lm.analysis import results
    return results.metrics(run_dir)
