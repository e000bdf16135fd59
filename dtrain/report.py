"""Plot one or more runs' ``metrics.jsonl`` side by side.

Usage::

    python -m dtrain.report runs/resnet20-cifar10-dgc runs/resnet20-cifar10-allreduce
    python -m dtrain.report runs/a runs/b --out docs/figures

Writes into ``--out`` (default: the first run directory's ``plots/``), one curve per run
(labelled with the run directory's name):

- ``loss_vs_step.png``, ``loss_vs_bytes.png``: training loss against the step and against the
  cumulative bytes sent per rank (log scale);
- ``metric_vs_step.png``, ``metric_vs_bytes.png``: held-out accuracy or perplexity;
- ``ratio_vs_step.png``: cumulative compression ratio (dense bytes / bytes sent).

A plot that no run has data for is skipped with a note. Needs matplotlib.
"""

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtrain.errors import EXIT_USAGE, UserError
from dtrain.metrics import METRICS_FILE, read_metrics

__all__ = ["Run", "load_run", "main", "plot_runs"]

TASK_METRICS = ("test_accuracy", "test_perplexity")


@dataclass
class Run:
    """One run's curves, each sorted by step (a step logged twice keeps its last line)."""

    label: str
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str, *, kind: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the lines of ``kind`` that have a finite number for ``key``."""
        lines = self.train if kind == "train" else self.eval
        pts = [(e["step"], e[key]) for e in lines if _number(e.get(key))]
        steps = np.array([p[0] for p in pts], dtype=float)
        return steps, np.array([p[1] for p in pts], dtype=float)

    def bytes_at(self, steps: np.ndarray) -> np.ndarray:
        """Cumulative bytes sent at ``steps``, interpolated between train lines (NaN: none)."""
        s, b = self.series("bytes_sent_total")
        if len(s) == 0:
            return np.full(len(steps), np.nan)
        return np.interp(steps, s, b, left=np.nan, right=b[-1])


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _by_step(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    last = {line["step"]: line for line in lines if _number(line.get("step"))}
    return [last[s] for s in sorted(last)]


def load_run(run_dir: Path) -> Run:
    """Read ``run_dir/metrics.jsonl``.

    Raises:
        UserError: The directory or its ``metrics.jsonl`` is missing, or no line is usable.
    """
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {METRICS_FILE}: pass dtrain run directories")
    lines = read_metrics(path)
    run = Run(
        label=run_dir.resolve().name,
        train=_by_step([e for e in lines if e.get("kind") == "train"]),
        eval=_by_step([e for e in lines if e.get("kind") == "eval"]),
    )
    if not run.train and not run.eval:
        raise UserError(f"{path} has no train or eval lines to plot")
    return run


def _task_metric(runs: list[Run]) -> str | None:
    """The held-out metric most runs report (accuracy wins a tie)."""
    counts = {m: sum(len(r.series(m, kind="eval")[0]) > 0 for r in runs) for m in TASK_METRICS}
    best = max(TASK_METRICS, key=lambda m: counts[m])
    return best if counts[best] else None


def _label(key: str) -> str:
    return {
        "loss": "training loss",
        "test_accuracy": "test accuracy",
        "test_perplexity": "test perplexity",
        "ratio_total": "cumulative compression ratio (dense / sent)",
        "bytes": "bytes sent per rank (cumulative)",
        "step": "step",
    }[key]


def plot_runs(runs: list[Run], out: Path) -> tuple[list[Path], list[str]]:
    """Write the plots of ``runs`` into ``out``.

    Returns:
        The paths written, and a note for each plot skipped for want of data.

    Raises:
        UserError: matplotlib is not installed, or there is nothing to plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("dtrain.report needs matplotlib: pip install matplotlib") from None

    metric = _task_metric(runs)
    # name -> (y key, kind, x is bytes)
    plots: dict[str, tuple[str | None, str, bool]] = {
        "loss_vs_step.png": ("loss", "train", False),
        "loss_vs_bytes.png": ("loss", "train", True),
        "metric_vs_step.png": (metric, "eval", False),
        "metric_vs_bytes.png": (metric, "eval", True),
        "ratio_vs_step.png": ("ratio_total", "train", False),
    }
    written, skipped = [], []
    for name, (key, kind, by_bytes) in plots.items():
        fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
        drawn = []
        for run in runs:
            if key is None:
                break
            x, y = run.series(key, kind=kind)
            if by_bytes:
                x = run.bytes_at(x)
                keep = np.isfinite(x) & (x > 0)  # log axis
                x, y = x[keep], y[keep]
            if len(x) == 0:
                continue
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=run.label)
            drawn.append(y)
        if not drawn:
            plt.close(fig)
            what = key or "test accuracy or perplexity"
            skipped.append(f"skipped {name}: no run has {what}{' by bytes' if by_bytes else ''}")
            continue
        assert key is not None  # without a key nothing is drawn
        if by_bytes:
            ax.set_xscale("log")
        ys = np.concatenate(drawn)
        if key in ("ratio_total", "test_perplexity") and ys.min() > 0 and ys.max() > 20 * ys.min():
            ax.set_yscale("log")
        ax.set_xlabel(_label("bytes" if by_bytes else "step"))
        ax.set_ylabel(_label(key))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = out / name
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if not written:
        raise UserError(
            "nothing to plot: no run has loss, test accuracy/perplexity or ratio_total values"
        )
    return written, skipped


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (2 for a user error)."""
    parser = argparse.ArgumentParser(
        prog="python -m dtrain.report", description="Plot runs' metrics.jsonl side by side."
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories")
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: FIRST_RUN/plots)"
    )
    args = parser.parse_args(argv)
    out = args.out or args.runs[0] / "plots"
    try:
        runs = [load_run(d) for d in args.runs]
        try:
            written, skipped = plot_runs(runs, out)
        except OSError as e:  # --out names a file, or a directory that cannot be written
            raise UserError(
                f"cannot write plots to {out}: {e.strerror or e}: use --out DIR"
            ) from None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for note in skipped:
        print(note, file=sys.stderr)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
