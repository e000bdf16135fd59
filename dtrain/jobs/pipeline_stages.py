"""The pipeline's work on rank 0: loading a stage's model, the post-training stages (low-rank
factorisation, torchao quantization, export and its onnxruntime check) and the measurements
of every stage's output (parameters, size on disk, MACs, CPU latency, held-out accuracy)."""

import contextlib
import logging
import os
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dtrain.checkpoint import (
    atomic_torch_save,
    load_shared,
    restore_model,
    save_model_checkpoint,
)
from dtrain.config import JobConfig, from_dict
from dtrain.data import Datasets
from dtrain.errors import UserError
from dtrain.jobs.pipeline_config import ExportStage, LowRankStage, QuantizeStage
from dtrain.lowrank import eligible_layers, factorize
from dtrain.models import build_model
from dtrain.pruning.measure import latency_ms, macs

__all__ = ["Artifact", "Bench", "job_config_of", "run_export", "run_lowrank", "run_quantize"]

logger = logging.getLogger(__name__)


@dataclass
class Artifact:
    """What a stage hands to the next: a float dtrain checkpoint (the structure and float
    weights), and the int8 weights of a quantize stage over that structure."""

    checkpoint: str
    quantized: str = ""
    """A torchao ``state_dict()`` file (``torch.load(weights_only=True)``), or empty: float."""
    method: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def job_config_of(checkpoint: str) -> tuple[JobConfig, dict[str, Any]]:
    """``(the training config a checkpoint was written with, its shared state)``; the job's own
    sections (``[prune]``, ``[distill]``) are left out."""
    _, shared = load_shared(checkpoint)
    sections = {k: v for k, v in shared["config"].items() if k in JobConfig.__dataclass_fields__}
    return from_dict(sections, source=f"{checkpoint}'s config"), shared


def _state_bytes(model: nn.Module, path: Path) -> int:
    atomic_torch_save(path, model.state_dict())
    return path.stat().st_size


class Bench:
    """Rank 0's data and clock: loads the models the stages hand on and measures them."""

    def __init__(self, data: Datasets, *, threads: int, repeats: int, samples: int) -> None:
        self.data = data
        self.threads = threads or (os.cpu_count() or 1)
        self.repeats = repeats
        self.x1 = data.x_test[:1]
        self.x64 = data.x_test[:64]
        self.example = data.x_test[:2]
        self.check = data.x_test[:samples]

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Every core of the node for rank 0's measurements (the other ranks wait)."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def calibration(self, batches: int, batch_size: int) -> list[Tensor]:
        """The first ``batches`` training batches (in order): calibration inputs."""
        x = self.data.x_train
        return [
            x[i : i + batch_size] for i in range(0, min(len(x), batches * batch_size), batch_size)
        ]

    def load(self, art: Artifact) -> nn.Module:
        """The artifact's model on the CPU in eval mode (int8 weights loaded if it has them)."""
        cfg, shared = job_config_of(art.checkpoint)
        model = build_model(cfg.model, self.data.info)
        restore_model(
            model,
            shared,
            what=f"pipeline input {art.checkpoint}",
            example_shape=self.data.info.in_shape,
        )
        if art.quantized:
            from dtrain.quantize import load_quantized

            load_quantized(model, art.quantized)
        return model.eval()

    @torch.no_grad()
    def accuracy(self, fn: Callable[[Tensor], Tensor]) -> float:
        """Top-1 accuracy of ``fn`` (a model or an onnxruntime run) on the held-out set (per
        token for a language model)."""
        x, y = self.data.x_test, self.data.y_test
        correct = 0
        for i in range(0, len(x), 256):
            out = fn(x[i : i + 256])
            correct += int((out.argmax(-1) == y[i : i + 256]).sum())
        return correct / max(1, y.numel())

    def row(
        self,
        stage: str,
        load: dict[str, str],
        *,
        model: nn.Module,
        size: int,
        float_model: nn.Module | None = None,
    ) -> dict[str, Any]:
        """One line of the report: the artifact ``load`` names (:meth:`runner`); parameters and
        MACs from ``model`` (``float_model``'s MACs where int8 tensors hide them from the
        counter)."""
        fn = self.runner(load, model=model)
        with self.measuring():
            try:
                mac = macs(model, self.x1)
            except Exception:  # torchao tensors the counter cannot see through
                mac = macs(float_model, self.x1) if float_model is not None else 0
            row = {
                "stage": stage,
                "runtime": RUNTIMES[load["kind"]],
                "params": sum(p.numel() for p in model.parameters()),
                "bytes": size,
                "macs": mac,
                "latency_b1_ms": latency_ms(fn, self.x1, repeats=self.repeats),
                "latency_b64_ms": latency_ms(fn, self.x64, repeats=self.repeats),
                "accuracy": self.accuracy(fn),
                "load": load,
            }
        logger.info("measured %s (%s): %s", stage, row["runtime"], row)
        return row

    def model_row(self, stage: str, art: Artifact, directory: Path, **kw: Any) -> dict:
        """:meth:`row` of an artifact's PyTorch model, its size that of its ``state_dict``
        saved in ``directory/model.pt``."""
        model = self.load(art)
        size = _state_bytes(model, directory / "model.pt")
        return self.row(stage, {"kind": "model", **art.as_dict()}, model=model, size=size, **kw)

    def file_row(self, stage: str, kind: str, path: Path, model: nn.Module, **kw: Any) -> dict:
        """:meth:`row` of an exported file (``kind``: ``onnx`` or ``pt2``) of ``model``."""
        from dtrain.export import artifact_bytes

        load = {"kind": kind, "path": str(path)}
        return self.row(stage, load, model=model, size=artifact_bytes(path), **kw)

    def runner(self, load: dict[str, str], *, model: nn.Module | None = None) -> Callable:
        """A function of a batch for the artifact a row's ``load`` names: a dtrain
        checkpoint's model (``model``, if given, is it), a ``.pt2`` program, an ONNX file
        (an onnxruntime session with :attr:`threads`)."""
        if load["kind"] == "model":
            if model is not None:
                return model
            fields = {k: v for k, v in load.items() if k != "kind"}
            return self.load(Artifact(**fields))
        if load["kind"] == "pt2":
            from dtrain.export import load_pt2

            program = load_pt2(load["path"])
            return lambda x: program(x)  # an exported program's module has no eval()
        from dtrain.export import ort_run, ort_session

        session = ort_session(load["path"], threads=self.threads)
        return lambda x: ort_run(session, x)

    def remeasure(self, rows: list[dict[str, Any]], *, rounds: int) -> None:
        """Every row's latencies measured again, side by side: ``rounds`` rounds, each timing
        every artifact in turn, the median of the rounds kept (a stage's own timing, taken when
        it ended, saw whatever else the node was doing then)."""
        fns = [self.runner(r["load"]) for r in rows]
        times: list[list[tuple[float, float]]] = [[] for _ in rows]
        with self.measuring():
            for _ in range(rounds):
                for fn, t in zip(fns, times, strict=True):
                    t.append((latency_ms(fn, self.x1, repeats=self.repeats),
                              latency_ms(fn, self.x64, repeats=self.repeats)))  # fmt: skip
        for r, t in zip(rows, times, strict=True):
            r["latency_b1_ms"] = statistics.median(a for a, _ in t)
            r["latency_b64_ms"] = statistics.median(b for _, b in t)


RUNTIMES = {"model": "pytorch", "pt2": "pytorch (torch.export)", "onnx": "onnxruntime"}


# ------------------------------------------------------------------------------ low-rank


def run_lowrank(
    bench: Bench, art: Artifact, cfg: LowRankStage, out: Path
) -> tuple[Artifact, dict[str, Any]]:
    """Factorise the artifact's layers; writes a float checkpoint to ``out`` (the next
    stage's input, or the fine-tune's ``model.init_from``). Returns it and the plans."""
    model = bench.load(art)
    layers = eligible_layers(model)
    for name in (*cfg.layers, *cfg.skip):
        if name not in layers:
            from dtrain.config import _closest

            raise UserError(
                f"lowrank: {name!r} is not a Linear layer or 1x1 convolution of the model"
                f"{_closest(name, list(layers))} (eligible: {', '.join(layers) or 'none'})"
            )
    chosen = {
        n: m for n, m in layers.items() if (not cfg.layers or n in cfg.layers) and n not in cfg.skip
    }
    plans = factorize(model, chosen, rank=cfg.rank or None, energy=cfg.energy or None)
    for p in plans:
        if p.rank is None:
            logger.info("low-rank %s stays whole: %s", p.name, p.reason)
    _, shared = load_shared(art.checkpoint)
    kept: dict[str, Any] = {k: shared[k] for k in ("config", "num_classes", "vocab") if k in shared}
    state = {
        **kept,
        "model": model.state_dict(),
        "architecture": list(getattr(model, "pruning_history", [])),
        "lowrank": dict(getattr(model, "lowrank_ranks", {})),
        "step": 0,
        "world_size": 1,
        "extensions": {},
    }
    ckpt = save_model_checkpoint(out, state)
    return Artifact(str(ckpt)), {"layers": [p.as_dict() for p in plans]}


# ------------------------------------------------------------------------------ quantize


def run_quantize(
    bench: Bench, art: Artifact, cfg: QuantizeStage, out: Path, *, batch_size: int
) -> tuple[Artifact, dict[str, Any]]:
    """torchao quantization of the artifact's model (``qat``: of the QAT fine-tune's weights,
    prepared as they trained); the int8 ``state_dict`` goes to ``out/model.pt``."""
    from dtrain.quantize import qat_prepare, quantize_model

    model = bench.load(art)
    if cfg.method == "qat":
        qat_prepare(model, skip=cfg.skip)
    calibration = None
    if cfg.method == "int8_static":
        calibration = bench.calibration(cfg.calibration_batches, batch_size)
    report = quantize_model(
        model, cfg.method, bench.example, calibration=calibration, skip=cfg.skip
    )
    if not report.quantized:
        raise UserError(
            f"quantize: no layer of the model could be quantized with {cfg.method} ("
            + "; ".join(f"{k}: {v}" for k, v in report.skipped.items())
            + "): leave the quantize stage out"
        )
    path = out / "model.pt"
    atomic_torch_save(path, model.state_dict())
    return Artifact(art.checkpoint, str(path), cfg.method), report.as_dict()


# ------------------------------------------------------------------------------- export


def _check(
    what: str, reference: Tensor, got: Tensor, *, atol: float, rtol: float, agreement: float = 0
) -> dict:
    from dtrain.export import max_difference

    diff, allowed = max_difference(reference, got, atol=atol, rtol=rtol)
    agree = float((reference.argmax(-1) == got.argmax(-1)).float().mean())
    if not (diff <= allowed and agree >= agreement):
        knobs = "export.atol / rtol" if not agreement else "export.quantized_rtol / _agreement"
        raise UserError(
            f"export: {what} does not match PyTorch: the largest difference is {diff:.3g} "
            f"(allowed {allowed:.3g} = atol + rtol · max |output|), top-1 agreement "
            f"{agree:.1%}"
            + (f" (at least {agreement:.1%})" if agreement else "")
            + f"; raise {knobs} if that is acceptable"
        )
    logger.info("export: %s matches PyTorch: max |diff| %.3g <= %.3g", what, diff, allowed)
    return {"max_abs_diff": diff, "allowed": allowed, "top1_agreement": agree}


def run_export(
    bench: Bench, art: Artifact, cfg: ExportStage, out: Path, *, batch_size: int
) -> tuple[dict[str, str], list[dict[str, Any]], dict[str, Any]]:
    """Export the artifact's model to ``out`` and check every file against PyTorch on
    held-out inputs. Returns ``({kind: file}, report rows, checks)``; the last file is the
    deployable one (int8 ONNX where made)."""
    from dtrain.export import (
        ExportFailed,
        export_onnx,
        export_pt2,
        load_pt2,
        ort_quantize_dynamic,
        ort_quantize_static,
        ort_run,
        ort_session,
    )

    model = bench.load(art)
    float_model = bench.load(Artifact(art.checkpoint)) if art.quantized else model
    with torch.no_grad():
        ref = model(bench.check)
    files: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    tight = {"atol": cfg.atol, "rtol": cfg.rtol}

    def ort_row(stage: str, path: Path, source: nn.Module) -> None:
        rows.append(bench.file_row(stage, "onnx", path, source, float_model=float_model))

    if "pt2" in cfg.formats:
        try:
            path = export_pt2(model, bench.example, out / "model.pt2")
        except ExportFailed as e:
            raise UserError(f"export: {e}") from None
        loaded = load_pt2(path)
        with torch.no_grad():
            checks["pt2"] = _check("model.pt2", ref, loaded(bench.check), **tight)
        files["pt2"] = str(path)
        rows.append(bench.file_row("export (pt2)", "pt2", path, model, float_model=float_model))
    if "onnx" not in cfg.formats:
        return files, rows, checks
    mode, reason = cfg.onnx_quantize, ""
    if mode in ("auto", "none"):
        try:
            path = export_onnx(model, bench.example, out / "model.onnx")
        except ExportFailed as e:
            if not art.quantized or mode == "none":
                raise UserError(f"export: {e}") from None
            # torchao's int8 activations have no ONNX function: onnxruntime quantizes instead
            mode = "static" if art.method == "int8_static" else "dynamic"
            reason = f"{art.method} has no ONNX translation ({e}); onnxruntime's {mode} int8"
            logger.info("export: %s", reason)
        else:
            checks["onnx"] = _check(
                "model.onnx", ref, ort_run(ort_session(path), bench.check), **tight
            )
            files["onnx"] = str(path)
            ort_row("export (onnx)", path, model)
            return files, rows, checks
    # a float ONNX model, checked, then int8 by onnxruntime, checked against what it stands for
    fpath = out / "model.float.onnx"
    try:
        export_onnx(float_model, bench.example, fpath)
    except ExportFailed as e:
        raise UserError(f"export: {e}") from None
    with torch.no_grad():
        fref = float_model(bench.check)
    checks["onnx_float"] = _check(
        "model.float.onnx", fref, ort_run(ort_session(fpath), bench.check), **tight
    )
    files["onnx_float"] = str(fpath)
    ort_row("export (onnx float)", fpath, float_model)
    qpath = out / "model.int8.onnx"
    if mode == "static":
        ort_quantize_static(fpath, qpath, bench.calibration(cfg.calibration_batches, batch_size))
    else:
        ort_quantize_dynamic(fpath, qpath)
    checks["onnx_int8"] = _check(
        f"model.int8.onnx (onnxruntime {mode} int8)",
        ref,
        ort_run(ort_session(qpath), bench.check),
        atol=cfg.atol,
        rtol=cfg.quantized_rtol,
        agreement=cfg.quantized_agreement,
    )
    if reason:
        checks["onnx_int8"]["why"] = reason
    files["onnx_int8"] = str(qpath)
    ort_row(f"export (onnx int8 {mode})", qpath, float_model)
    return files, rows, checks
