"""Metrics: ``metrics.jsonl`` in the run directory, optional wandb, a tqdm bar; rank 0 only.

:func:`make_logger` gives rank 0 a :class:`MetricsLogger` and every other rank a
:class:`NullLogger` with the same methods, so call sites need no ``if rank == 0``::

    with make_logger(cfg.logging, run_dir, rank=rank, config=to_dict(cfg),
                     total_steps=total, start_step=step, resume=resumed) as metrics:
        for step in range(step + 1, total + 1):
            ...
            metrics.advance(loss=loss)
            if step % cfg.logging.every_steps == 0:
                metrics.log(step, {"loss": loss, "lr": lr, ...})
        metrics.summary(final)
    print(format_summary(final))

Each line of ``metrics.jsonl`` is ``{"kind": "train" | "eval" | "pre_flush" | "summary", "step":
..., "time": <wall seconds since the run started>, ...metrics}`` (``pre_flush``: the last step's
evaluation before DGC's residuals went into the weights; an extension's own kind, e.g.
``prune`` or ``distill``). ``python -m dtrain.report`` plots it.

In wandb the metrics are grouped by kind: ``train/loss``, ``eval/test_accuracy``,
``prune/sparsity``, ``distill/kd_loss``, and the communication counters of a train line
(:data:`COMM_METRICS`) as ``comm/ratio`` and so on, all charted against ``trainer/step``. At the
end of a run the plots of :mod:`dtrain.report` are written to ``run_dir/plots/`` and logged as
images (``report/loss_vs_step`` ...).
"""

import json
import logging
import math
import os
import sys
import time
import uuid
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TextIO, cast

from dtrain.checkpoint import atomic_write_text
from dtrain.config import LoggingConfig
from dtrain.errors import UserError

__all__ = [
    "COMM_METRICS",
    "MetricsLogger",
    "NullLogger",
    "check_wandb",
    "format_summary",
    "make_logger",
    "read_metrics",
    "wandb_identity",
    "wandb_keys",
]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id"
STEP_METRIC = "trainer/step"  # wandb charts against this, not its own step counter
# What the trainer's train lines carry about communication: in wandb under comm/, not train/.
COMM_METRICS = frozenset(
    ("bytes_sent", "dense_bytes", "bytes_sent_total", "dense_bytes_total", "ratio", "ratio_total",
     "density")
)  # fmt: skip


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl``, skipping lines that do not parse.

    A line cut short by a crash is the usual unparsable one.
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def _plain(value: Any) -> Any:
    """Numbers as Python scalars (tensors and numpy scalars via ``item()``)."""
    if hasattr(value, "item"):
        value = value.item()
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class NullLogger:
    """What ranks other than 0 get: every method does nothing."""

    def log(self, step: int, metrics: dict[str, float], *, kind: str = "train") -> None:
        """Do nothing."""

    def advance(self, n: int = 1, **postfix: float) -> None:
        """Do nothing."""

    def summary(self, metrics: dict[str, Any]) -> None:
        """Do nothing."""

    def close(self, *, failed: bool = False) -> None:
        """Do nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class MetricsLogger(NullLogger):
    """Writes metrics to ``run_dir/metrics.jsonl`` (and wandb), shows a progress bar.

    Args:
        cfg: The ``[logging]`` section.
        run_dir: The run directory (created if missing).
        config: The resolved config as a dict, for wandb.
        total_steps: Length of the run in steps, for the progress bar.
        start_step: The step training starts from (the checkpoint's when resuming).
        resume: Continue the existing ``metrics.jsonl``: lines after ``start_step`` (written by
            the interrupted run after its last checkpoint) and its summary are dropped. Without
            it an existing file is replaced.

    Raises:
        UserError: wandb is asked for but is not installed or does not start.
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: Path,
        *,
        config: dict[str, Any],
        total_steps: int,
        start_step: int = 0,
        resume: bool = False,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        # wandb first: if it cannot start, the old metrics.jsonl is still untouched.
        self._wandb = _start_wandb(cfg, self.run_dir, config=config, resume=resume)
        self._time_offset = self._prepare_file(start_step) if resume else 0.0
        if not resume:
            atomic_write_text(self.path, "")
        self._t0 = time.monotonic()
        self._last_step = start_step
        # closed in close()
        self._file: TextIO | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._bar = None
        if cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _prepare_file(self, start_step: int) -> float:
        """Drop what the interrupted run logged after ``start_step``; its last time."""
        if not self.path.exists():
            return 0.0
        kept = [
            line
            for line in read_metrics(self.path)
            if line.get("kind") != "summary" and _plain(line.get("step", 0)) <= start_step
        ]
        atomic_write_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))
        times = [t for line in kept if isinstance(t := line.get("time"), (int, float))]
        return max(times, default=0.0)

    @property
    def elapsed(self) -> float:
        """Wall seconds since the run started, including the time before a resume."""
        return self._time_offset + time.monotonic() - self._t0

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError("MetricsLogger is closed")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log(self, step: int, metrics: dict[str, float], *, kind: str = "train") -> None:
        """Append one line ``{"kind", "step", "time", **metrics}``; to wandb as ``kind/name``.

        Args:
            step: The optimizer step.
            metrics: Name -> number (tensors and numpy scalars are converted).
            kind: ``train``, ``eval``, ``pre_flush``, or an extension's (``prune``, ...).
        """
        values = {k: _plain(v) for k, v in metrics.items()}
        self._write({"kind": kind, "step": step, "time": round(self.elapsed, 3), **values})
        self._last_step = step
        if self._wandb is not None:
            # The optimizer step is a logged metric, not wandb's own step: a resumed run logs
            # again the steps its predecessor logged after the last checkpoint, which wandb
            # would drop as "not monotonically increasing".
            self._wandb.log({STEP_METRIC: step, **wandb_keys(kind, values)})
        text = f"{kind} step {step}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        if self._bar is None:
            logger.info(text)
        elif kind != "train":  # train metrics show in the bar's postfix
            self._bar.write(text, file=sys.stderr)

    def advance(self, n: int = 1, **postfix: float) -> None:
        """Move the progress bar ``n`` steps; ``postfix`` (e.g. ``loss=0.3``) shows beside it."""
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix({k: _fmt(_plain(v)) for k, v in postfix.items()}, refresh=False)
        self._bar.update(n)

    def summary(self, metrics: dict[str, Any]) -> None:
        """Append a ``{"kind": "summary", ...}`` line; with wandb, set the run's summary and log
        the :mod:`dtrain.report` plots of the run as images."""
        values = {k: _plain(v) for k, v in metrics.items()}
        self._write({"kind": "summary", "time": round(self.elapsed, 3), **values})
        if self._wandb is not None:
            self._wandb.summary.update(values)
            self._log_plots(self._wandb)

    def _log_plots(self, run: Any) -> None:
        """The report plots into ``run_dir/plots/`` and to wandb as ``report/<name>``."""
        import wandb

        from dtrain.report import load_run, plot_runs  # dtrain.report imports this module

        try:
            written, _ = plot_runs([load_run(self.run_dir)], self.run_dir / "plots")
        except (UserError, OSError) as e:  # too short a run to plot, or plots/ not writable
            logger.warning("no report plots for wandb: %s", e)
            return
        images = {f"report/{p.stem}": wandb.Image(str(p)) for p in written}
        run.log({STEP_METRIC: self._last_step, **images})

    def close(self, *, failed: bool = False) -> None:
        """Close the bar, the file and the wandb run (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            run.finish(exit_code=1 if failed else 0)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=exc_type is not None)


def wandb_keys(kind: str, values: dict[str, Any]) -> dict[str, Any]:
    """wandb's names for one line's values: ``kind/name``, the communication counters of a train
    line as ``comm/name``.

    Example::

        >>> wandb_keys("train", {"loss": 0.5, "ratio": 900.0})
        {'train/loss': 0.5, 'comm/ratio': 900.0}
    """
    return {
        f"{'comm' if kind == 'train' and k in COMM_METRICS else kind}/{k}": v
        for k, v in values.items()
    }


def wandb_identity(cfg: LoggingConfig, run_dir: Path) -> dict[str, str | None]:
    """``project``, ``entity``, ``group`` and ``name`` for ``wandb.init``: the config's value,
    else the ``WANDB_*`` variable (project: ``dtrain``, name: the run directory's name)."""
    env = os.environ
    return {
        "project": cfg.wandb_project or env.get("WANDB_PROJECT") or "dtrain",
        "entity": cfg.wandb_entity or env.get("WANDB_ENTITY") or None,
        "group": cfg.wandb_group or env.get("WANDB_RUN_GROUP") or None,
        "name": cfg.wandb_name or env.get("WANDB_NAME") or run_dir.name,
    }


def check_wandb(cfg: LoggingConfig) -> None:
    """UserError when ``cfg.wandb`` asks for wandb and it is not installed (nothing imported)."""
    if cfg.wandb != "disabled" and find_spec("wandb") is None:
        raise UserError(
            f"logging.wandb = {cfg.wandb!r} needs wandb: pip install wandb "
            f"(or --logging.wandb=disabled)"
        )


def _start_wandb(
    cfg: LoggingConfig, run_dir: Path, *, config: dict[str, Any], resume: bool
) -> Any | None:
    """A wandb run writing under ``run_dir/wandb``, or None when ``cfg.wandb`` is disabled.

    The run id is kept in ``run_dir/wandb_id`` so that a resumed job continues the same run.
    """
    if cfg.wandb == "disabled":
        return None
    check_wandb(cfg)
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else ""
    if not run_id:
        run_id = uuid.uuid4().hex[:8]
        atomic_write_text(id_file, run_id + "\n")
    try:
        who = wandb_identity(cfg, run_dir)
        run = wandb.init(
            project=who["project"],
            entity=who["entity"],
            group=who["group"],
            name=who["name"],
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=cast(Literal["online", "offline"], cfg.wandb),  # LoggingConfig checks it
            config=config,
            # No console capture: it would wrap stdout/stderr under the progress bar.
            settings=wandb.Settings(console="off", silent=True),
        )
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC)  # charts against the optimizer step
        return run
    except Exception as e:  # wandb's own errors: not logged in, no network, bad project
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = "run `wandb login`, or " if cfg.wandb == "online" else ""
        raise UserError(
            f"logging.wandb = {cfg.wandb!r} could not start ({reason}): {hint}use "
            f"--logging.wandb=offline or disabled"
        ) from None


def make_logger(
    cfg: LoggingConfig,
    run_dir: Path,
    *,
    rank: int,
    config: dict[str, Any],
    total_steps: int,
    start_step: int = 0,
    resume: bool = False,
) -> MetricsLogger | NullLogger:
    """A :class:`MetricsLogger` on rank 0, a :class:`NullLogger` elsewhere.

    Args:
        cfg: The ``[logging]`` section.
        run_dir: The run directory.
        rank: This process's rank.
        config: The resolved config as a dict (stored in the wandb run).
        total_steps: Length of the run in steps.
        start_step: The step training starts from.
        resume: The job continues from a checkpoint at ``start_step``.
    """
    if rank != 0:
        return NullLogger()
    return MetricsLogger(
        cfg,
        run_dir,
        config=config,
        total_steps=total_steps,
        start_step=start_step,
        resume=resume,
    )


# ------------------------------------------------------------------------------------ summary


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def format_summary(metrics: dict[str, Any]) -> str:
    """The one line a job prints at its end; parts whose keys are missing are left out.

    Args:
        metrics: e.g. ``test_accuracy`` (percent) or ``test_perplexity``, ``ratio_total``,
            ``bytes_sent_total``, ``dense_bytes_total``, ``steps``, ``wall_seconds``.

    Example::

        >>> format_summary({"test_accuracy": 97.12, "ratio_total": 375.0, "steps": 300,
        ...                 "bytes_sent_total": 1.2e6, "dense_bytes_total": 4.5e8,
        ...                 "wall_seconds": 83.0})
        'final test accuracy 97.12% | compression ratio 375x | sent 1.2 MB vs 450 MB dense | 300 steps in 1m 23s'
    """  # noqa: E501
    m = {k: _plain(v) for k, v in metrics.items()}
    parts = []
    if "test_accuracy" in m:
        parts.append(f"final test accuracy {m['test_accuracy']:.2f}%")
    if "test_perplexity" in m:
        parts.append(f"final test perplexity {m['test_perplexity']:.3f}")
    sent, dense = m.get("bytes_sent_total"), m.get("dense_bytes_total")
    ratio = m.get("ratio_total")
    if ratio is None and sent and dense is not None:
        ratio = dense / sent
    if ratio is not None and math.isfinite(ratio) and ratio > 0:
        parts.append(
            f"compression ratio {ratio:,.0f}x"
            if ratio >= 100
            else f"compression ratio {ratio:.3g}x"
        )
    if sent is not None:
        parts.append(
            f"sent {_bytes(sent)}" + (f" vs {_bytes(dense)} dense" if dense is not None else "")
        )
    tail = f"{m['steps']} steps" if "steps" in m else ""
    if "wall_seconds" in m:
        tail += f" in {_duration(m['wall_seconds'])}"
    if tail:
        parts.append(tail.strip())
    return " | ".join(parts) or "done"
