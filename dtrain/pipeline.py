"""Compress a trained model: distill → prune → low-rank → quantize → export, one config.

The stages a config names run in order (``[pipeline] stages``), each in its own directory inside
the pipeline's (``out_dir/name/<stage>``), each one's output the next one's input. Training stages
(distill, prune, the low-rank and QAT fine-tunes) run on every rank with the configured hook
(DGC by default); the post-training stages run on rank 0 while the others wait. A finished stage
is not run again; ``--resume`` continues an unfinished one::

    python -m dtrain.pipeline --config configs/pipeline/digits.toml
    torchrun --nproc_per_node=2 -m dtrain.pipeline --config configs/pipeline/digits.toml
    NPROC=2 CONFIG=configs/pipeline/digits.toml bash launch/pipeline.sh
    sbatch --nodes=1 slurm/pipeline.sbatch

Options: ``--config FILE``, ``--section.key=value`` overrides of the pipeline file (e.g.
``--pipeline.stages=lowrank,export``), ``--resume``, ``--check`` (validate the config,
the source and the stages' job configs, then exit). Writes ``pipeline_report.json`` / ``.md``
(one row per stage: parameters, size on disk, MACs, CPU latency at batch 1 and 64, held-out
accuracy) and ``accuracy_vs_size.png``. Errors in the input print one line and exit with code 2.
"""

import argparse
import sys

from dtrain.config import load_config
from dtrain.distill import DISTILL
from dtrain.distributed import destroy_distributed, init_distributed, launch_env, setup_logging
from dtrain.errors import EXIT_USAGE, UserError, should_print
from dtrain.jobs.pipeline import Pipeline, qat_trainer
from dtrain.jobs.pipeline_config import PipelineFile
from dtrain.jobs.pipeline_report import table, write_report
from dtrain.prune import PRUNE
from dtrain.train import TRAIN, Job, exit_now, run

PROG = "dtrain.pipeline"


def _parse(argv: list[str] | None) -> tuple[PipelineFile, argparse.Namespace]:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                allow_abbrev=False)  # fmt: skip
    p.add_argument("--config", help="TOML pipeline config (see configs/pipeline/)")
    p.add_argument("--resume", action="store_true", help="continue an unfinished stage")
    p.add_argument("--check", action="store_true", help="validate the input, then exit")
    args, overrides = p.parse_known_args(argv)
    return load_config(args.config, overrides, PipelineFile), args


def main(argv: list[str] | None = None) -> int:
    rank = 0
    try:
        rank = int(launch_env()["rank"])
        setup_logging(rank)
        cfg, args = _parse(argv)
        q = cfg.quantize
        jobs = {"distill": DISTILL, "prune": PRUNE, "train": TRAIN}
        if "quantize" in cfg.pipeline.stages and q.method == "qat":
            jobs["qat"] = Job(f"{PROG} (qat)", "QAT fine-tune", trainer=qat_trainer(q.skip))
        if args.check:
            from dtrain.jobs.pipeline import check

            check(cfg)
            print(f"{PROG}: ok: {cfg.pipeline.out_dir}/{cfg.pipeline.name}")
            return 0
        p = cfg.pipeline
        info = init_distributed(device=p.device, threads=p.threads)
        pipeline = Pipeline(cfg, info, resume=args.resume,
                            runner=lambda c, i, kind: run(c, i, jobs[kind]))  # fmt: skip
        rows = pipeline.run()
        if info.is_main:
            report = write_report(pipeline.dir, rows)
            c = report["final_vs_source"]
            print(table(rows), flush=True)
            print(
                f"{PROG}: {pipeline.dir}: final {c['final']} {c['smaller']:.1f}x smaller, "
                f"{c['faster_b64']:.2f}x faster at batch 64, "
                f"accuracy {c['accuracy_change_points']:+.2f} points",
                flush=True,
            )
        return 0
    except UserError as e:
        if should_print(e, rank):
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    finally:
        destroy_distributed()


if __name__ == "__main__":
    exit_now(main())
