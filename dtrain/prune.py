"""Prune a trained model and fine-tune it with DDP and a communication hook (DGC by default).

Starts from a ``dtrain.train`` run (``--prune.source=RUN_DIR`` or a checkpoint directory),
prunes by ``[prune] method`` (magnitude, gradual, iterative), fine-tunes with the same trainer
and writes the pruned checkpoint, ``prune_report.json`` and ``accuracy_vs_sparsity.png`` into its
own run directory::

    python -m dtrain.prune --config configs/prune/digits_global90.toml
    torchrun --nproc_per_node=2 -m dtrain.prune --config configs/prune/digits_global90.toml \\
        --prune.source=runs/digits_cnn-digits-dgc
    NPROC=2 bash launch/prune.sh --prune.sparsity=0.95
    sbatch --nodes=2 slurm/prune.sbatch

Every rank verifies that all ranks chose the same masks before any weight changes. Options as
for ``dtrain.train``: ``--config``, ``--section.key=value`` (``[prune]`` included), ``--resume``
(also in the middle of a gradual or iterative schedule), ``--check``. Errors in the input print
one line and exit with code 2.
"""

from dtrain.jobs.prune_report import write_report
from dtrain.jobs.pruning import PruneJobConfig, make_trainer
from dtrain.train import Job, exit_now, main

PRUNE = Job(
    "dtrain.prune",
    __doc__.splitlines()[0],
    config=PruneJobConfig,
    trainer=make_trainer,
    finish=write_report,
)

if __name__ == "__main__":
    exit_now(main(job=PRUNE))
