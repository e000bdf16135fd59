"""The pipeline's report: one row per stage (``pipeline_report.json`` and ``.md``), the final
artifact against the starting model, and a PNG of accuracy against size on disk."""

import json
from pathlib import Path
from typing import Any

from dtrain.checkpoint import atomic_write_text

__all__ = ["HEADERS", "compare", "table", "write_report"]

HEADERS = ("stage", "runtime", "params", "size (kB)", "MMACs", "b1 (ms)", "b64 (ms)", "accuracy")


def _cells(r: dict[str, Any]) -> list[str]:
    return [
        r["stage"],
        r["runtime"],
        f"{r['params']:,}",
        f"{r['bytes'] / 1e3:.1f}",
        f"{r['macs'] / 1e6:.3f}",
        f"{r['latency_b1_ms']:.3f}",
        f"{r['latency_b64_ms']:.2f}",
        f"{100 * r['accuracy']:.2f}%",
    ]


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The final artifact (the last row: the deployable file) against the starting model (the
    ``source`` row, in PyTorch): times smaller on disk, times faster at batch 64 (also against
    the faster of the source's PyTorch and onnxruntime runs), the accuracy's change in points."""
    source = next(r for r in rows if r["stage"] == "source")
    best_source = min(r["latency_b64_ms"] for r in rows if r["stage"].startswith("source"))
    final = rows[-1]
    return {
        "final": final["stage"],
        "runtime": final["runtime"],
        "smaller": source["bytes"] / max(1, final["bytes"]),
        "faster_b64": source["latency_b64_ms"] / final["latency_b64_ms"],
        "faster_b64_than_best_source": best_source / final["latency_b64_ms"],
        "accuracy_change_points": 100 * (final["accuracy"] - source["accuracy"]),
    }


def _plot(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["bytes"] / 1e3 for r in rows]
    ys = [100 * r["accuracy"] for r in rows]
    ax.plot(xs, ys, "-", color="lightgray", zorder=1)
    for r, x, y in zip(rows, xs, ys, strict=True):
        marker = "s" if r["runtime"] == "onnxruntime" else "o"
        ax.scatter([x], [y], marker=marker, zorder=2)
        ax.annotate(
            f"{r['stage']}\n{r['latency_b64_ms']:.2f} ms",
            (x, y),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, 4),
        )
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (kB, log scale); squares: onnxruntime")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("accuracy against size across the stages (batch-64 latency beside)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(directory: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``pipeline_report.json`` / ``.md`` and ``accuracy_vs_size.png`` in ``directory``;
    returns the report."""
    c = compare(rows)
    report: dict[str, Any] = {"rows": rows, "final_vs_source": c}
    atomic_write_text(directory / "pipeline_report.json", json.dumps(report, indent=1) + "\n")
    text = (
        table(rows)
        + f"\n\nFinal ({c['final']}) against the starting model: {c['smaller']:.1f}x smaller "
        f"on disk, {c['faster_b64']:.2f}x faster at batch 64 ({c['runtime']}; "
        f"{c['faster_b64_than_best_source']:.2f}x against the faster of the source's PyTorch "
        f"and onnxruntime runs), accuracy {c['accuracy_change_points']:+.2f} points.\n"
    )
    atomic_write_text(directory / "pipeline_report.md", text)
    _plot(directory / "accuracy_vs_size.png", rows)
    return report
