"""Distil a trained teacher into a student with DDP and a communication hook (DGC by default).

The teacher comes from a ``dtrain.train`` or ``dtrain.prune`` run (``--distill.teacher=RUN_DIR``),
runs forward only (eval mode, no gradients, never in DDP) on every rank; the student (``[model]``,
``model.init_from`` for a pruned one) trains on ``(1 − α)·CE + α·T²·KL`` plus optional feature
hints (``distill.features``)::

    python -m dtrain.distill --config configs/distill/digits_kd.toml
    torchrun --nproc_per_node=2 -m dtrain.distill --config configs/distill/digits_kd.toml
    NPROC=2 bash launch/distill.sh
    sbatch --nodes=2 slurm/distill.sbatch

Options as for ``dtrain.train``: ``--config``, ``--section.key=value`` (``[distill]``
included), ``--resume``, ``--check``. Errors in the input print one line and exit with code 2.
"""

from dtrain.jobs.distill import DistillJobConfig, make_trainer
from dtrain.train import Job, exit_now, main

DISTILL = Job(
    "dtrain.distill",
    __doc__.splitlines()[0],
    config=DistillJobConfig,
    trainer=make_trainer,
)

if __name__ == "__main__":
    exit_now(main(job=DISTILL))
