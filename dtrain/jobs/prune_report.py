"""The pruning job's report: ``prune_report.json`` and ``accuracy_vs_sparsity.png``.

:func:`write_report` measures the pruned model at the end of the job (rank 0): sparsity per
layer and overall, parameters, MACs, CPU latency at batch 1 and 64, the accuracy before pruning,
after one-shot pruning and after fine-tuning, bytes per step; for channels also the model before
and its widths (per stage for a ResNet); and plots accuracy against sparsity or MACs.
"""

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dtrain.checkpoint import atomic_write_text
from dtrain.jobs.pruning import PruneExtension, metric_key
from dtrain.models import build_model
from dtrain.models.vision import ResNet
from dtrain.pruning.measure import latency_ms, macs, nonzero_parameters
from dtrain.pruning.structured import widths
from dtrain.trainer import Trainer

__all__ = ["PLOT", "REPORT", "write_report"]

logger = logging.getLogger(__name__)

REPORT = "prune_report.json"
PLOT = "accuracy_vs_sparsity.png"


def write_report(trainer: Trainer, summary: dict[str, Any]) -> None:
    """Measure the pruned model and write ``prune_report.json`` and ``accuracy_vs_sparsity.png``
    into the run directory (rank 0); adds the headline figures to ``summary``."""
    ext = next(e for e in trainer.extensions if isinstance(e, PruneExtension))
    assert ext.masks is not None
    metric = metric_key(summary)
    counts = ext.masks.counts()
    channels = ext.p.granularity == "channels"
    params = sum(p.numel() for p in trainer.model.parameters())
    if channels:  # the fraction of the parameters removed
        summary["sparsity"] = 1.0 - params / ext.dense["parameters"]
    else:
        kept = sum(k for k, _ in counts.values())
        summary["sparsity"] = 1.0 - kept / sum(n for _, n in counts.values())
    summary[f"{metric}_before"] = ext.before[metric]
    point = next(x for x in ext.sweep if x["sparsity"] == ext.p.sparsity)
    pruned = point[metric]
    summary[f"{metric}_pruned"] = pruned
    if f"{metric}_recalibrated" in point:  # channels: with re-estimated batch-norm statistics
        summary[f"{metric}_pruned_recalibrated"] = point[f"{metric}_recalibrated"]
    if not trainer.info.is_main:
        return
    model = trainer.model
    x = trainer.data.x_test
    one, batch = x[:1].to(trainer.info.device), _batch_of(x, 64).to(trainer.info.device)
    steps = max(int(summary["steps"]), 1)
    stats = trainer.hook_state.stats()  # DGC: pairs with and without the masks
    report: dict[str, Any] = {
        "source": ext.source_path,
        "method": ext.p.method,
        "granularity": ext.p.granularity,
        "importance": ext.p.criterion,
        "scope": ext.p.scope,
        "ratio": ext.p.sparsity,
        "metric": metric.removeprefix("test_"),
        f"{metric}_before": ext.before[metric],
        f"{metric}_pruned": pruned,
        f"{metric}_pruned_recalibrated": summary.get(f"{metric}_pruned_recalibrated"),
        f"{metric}_final": summary[metric],
        "sparsity": summary["sparsity"],
        "layers": {
            n.removesuffix(".weight"): {"kept": k, "numel": c, "sparsity": 1.0 - k / c}
            for n, (k, c) in counts.items()
        },
        "parameters": params,
        "nonzero_parameters": nonzero_parameters(model),
        "macs": macs(model, one),
        "nonzero_macs": macs(model, one, keep=ext.masks.keep),
        "latency_ms_batch1": latency_ms(model, one),
        "latency_ms_batch64": latency_ms(model, batch, repeats=10),
        "latency_threads": torch.get_num_threads(),
        "hook": trainer.cfg.comm.hook,
        "bytes_last_step": stats["bytes_sent"],
        "bytes_per_step": summary["bytes_sent_total"] / steps,
        "dense_bytes_per_step": summary["dense_bytes_total"] / steps,
        "steps": summary["steps"],
        "sweep": [dict(x) for x in ext.sweep],
        "rewind": ext.p.rewind_mode,
        "rounds": [*ext.rounds, {"step": summary["steps"], "sparsity": summary["sparsity"],
                                  metric: summary[metric]}],
    }  # fmt: skip
    if channels:
        report["parameters_before"] = ext.dense["parameters"]
        report["macs_before"] = ext.dense["macs"]
        report["widths_before"] = ext.dense["widths"]
        dense = build_model(trainer.cfg.model, trainer.data.info).to(trainer.info.device)
        report["widths"] = widths(model)
        if isinstance(model, ResNet) and isinstance(dense, ResNet):  # per stage: shared, inside
            report["stage_widths_before"] = dense.stage_widths()
            report["stage_widths"] = model.stage_widths()
        report["latency_ms_batch1_before"] = latency_ms(dense, one)  # the unpruned shape
        report["latency_ms_batch64_before"] = latency_ms(dense, batch, repeats=10)
    if "pairs_sent" in stats:
        report["pairs_last_step"] = stats["pairs_sent"]
        report["pairs_last_step_unmasked"] = stats["pairs_unmasked"]
    run_dir = trainer.run_dir
    atomic_write_text(run_dir / REPORT, json.dumps(report, indent=2) + "\n")
    _plot(run_dir / PLOT, report, metric)
    logger.info("pruning report: %s", run_dir / REPORT)


def _batch_of(x: Tensor, n: int) -> Tensor:
    reps = math.ceil(n / x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n] if reps > 1 else x[:n]


def _plot(path: Path, report: dict[str, Any], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = report["metric"]
    channels = report["granularity"] == "channels"
    fig, ax = plt.subplots(figsize=(6, 4))
    key = "macs" if channels else "sparsity"
    xs = [r[key] / (1e6 if channels else 1) for r in report["sweep"]]
    label = f"one-shot, {report['importance']}, {report['scope']}"
    ax.plot(xs, [r[metric] for r in report["sweep"]], "o-", label=label)
    recal = [(x, r[f"{metric}_recalibrated"]) for x, r in zip(xs, report["sweep"], strict=True)
             if f"{metric}_recalibrated" in r]  # fmt: skip
    if recal:
        ax.plot(*zip(*recal, strict=True), "s--", label="one-shot, batch norms re-estimated")
    ax.axhline(report[f"{metric}_before"], color="gray", ls="--", label="before pruning")
    x = report["macs"] / 1e6 if channels else report["sparsity"]
    ax.plot(
        [x], [report[f"{metric}_final"]], "r*", ms=14,
        label=f"{report['method']}, fine-tuned ({report['hook']})",
    )  # fmt: skip
    if channels:
        ax.axvline(report["macs_before"] / 1e6, color="gray", ls=":", label="MACs before")
    ax.set_xlabel("MACs per image (millions)" if channels else "sparsity of the pruned layers")
    ax.set_ylabel(f"test {name}" + (" (%)" if name == "accuracy" else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
