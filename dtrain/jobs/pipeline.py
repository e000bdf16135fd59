"""The compression pipeline: distill → prune → low-rank → quantize → export, one directory.

:class:`Pipeline` runs the stages a :class:`~dtrain.jobs.pipeline_config.PipelineFile` names,
each in ``<pipeline dir>/<stage>/``, each one's output (an
:class:`~dtrain.jobs.pipeline_stages.Artifact`) the next one's input. Training (``distill``,
``prune``, the fine-tunes of ``lowrank`` and of ``quantize.method = "qat"``) runs on every rank
with the configured hook, through the shared trainer; the post-training work (factorising,
quantizing, exporting, measuring) runs on rank 0 while the other ranks wait on a process group
of their own with a long timeout. A finished stage leaves ``stage.json`` (its spec, output and
measured rows) and is not run again while its spec (its section, its job config file, its
input) is unchanged; ``--resume`` continues an unfinished training stage from its checkpoint.
"""

import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dtrain.checkpoint import atomic_write_text, find_checkpoint
from dtrain.config import JobConfig, from_dict, parse_overrides, to_dict, to_toml
from dtrain.data import load_data
from dtrain.distributed import DistInfo
from dtrain.errors import PeerError, UserError
from dtrain.jobs.distill import DistillJobConfig
from dtrain.jobs.pipeline_config import PipelineFile
from dtrain.jobs.pipeline_stages import (
    Artifact,
    Bench,
    job_config_of,
    run_export,
    run_lowrank,
    run_quantize,
)
from dtrain.jobs.prune_config import PruneJobConfig
from dtrain.trainer import Trainer, initial_model

__all__ = ["STAGE_FILE", "Pipeline", "Runner", "check", "qat_trainer"]

logger = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
Runner = Callable[[JobConfig, DistInfo, str], dict[str, Any]]
"""``runner(cfg, info, kind)``: train ``cfg`` with the job ``kind`` (``distill``, ``prune``,
``train``, ``qat``) on every rank; the entry point supplies it (dtrain.train's life cycle)."""


def qat_trainer(skip: tuple[str, ...]) -> Callable[..., Trainer]:
    """A trainer factory whose model is ``model.init_from``'s, fake-quantized by torchao's QAT
    prepare step (its parameter names are the float model's, so its checkpoints restore into
    the float model and resume through this same source)."""
    from dtrain.quantize import qat_prepare

    def source(cfg: JobConfig, info: Any) -> Any:
        return qat_prepare(initial_model(cfg, info), skip=skip)

    def make(cfg: JobConfig, info: DistInfo, *, check_only: bool = False) -> Trainer:
        return Trainer(cfg, info, check_only=check_only, model_source=source)

    return make


_NEEDS = {"quantize": ("torchao",), "export": ("onnx", "onnxscript", "onnxruntime")}


def _check_installed(stages: tuple[str, ...]) -> None:
    import importlib.util

    for stage in stages:
        missing = [m for m in _NEEDS.get(stage, ()) if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(
                f"the {stage} stage needs {', '.join(missing)}: pip install 'dtrain[deploy]'"
            )


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""


class Pipeline:
    """One pipeline run (collective: every rank builds and runs it alike)."""

    def __init__(self, cfg: PipelineFile, info: DistInfo, *, resume: bool, runner: Runner) -> None:
        self.cfg = cfg
        self.info = info
        self.resume = resume
        self.runner = runner
        self.dir = Path(cfg.pipeline.out_dir) / cfg.pipeline.name
        self.source = str(find_checkpoint(cfg.pipeline.source))
        self.source_cfg, _ = job_config_of(self.source)
        self._bench: Bench | None = None
        self.group: Any = None
        if info.world_size > 1:  # waiting for rank 0 may take longer than the default group's
            self.group = dist.new_group(backend="gloo", timeout=timedelta(hours=12))
        _check_installed(cfg.pipeline.stages)
        for name in cfg.pipeline.stages:  # every stage's job config is checked before any runs
            if name in ("distill", "prune") or self._finetunes(name):
                section = getattr(cfg, name)
                if section.config and not Path(section.config).is_file():
                    raise UserError(f"{name}.config: {section.config} is not a file")
                model_from = "" if name == "distill" else self.source
                self._stage_job_config(
                    name, self.dir / name / "run", Artifact(self.source), model_from=model_from
                )

    # ----------------------------------------------------------------------------- helpers
    def _finetunes(self, name: str) -> bool:
        return (name == "lowrank" and self.cfg.lowrank.finetune) or (
            name == "quantize" and self.cfg.quantize.method == "qat"
        )

    @staticmethod
    def _job_cls(name: str) -> type[JobConfig]:
        return {"distill": DistillJobConfig, "prune": PruneJobConfig}.get(name, JobConfig)

    @property
    def bench(self) -> Bench:
        if self._bench is None:
            p = self.cfg.pipeline
            data = load_data(self.source_cfg.data, seed=self.source_cfg.run.seed)
            self._bench = Bench(
                data,
                threads=p.measure_threads,
                repeats=p.latency_repeats,
                samples=self.cfg.export.check_samples,
            )
        return self._bench

    def _on_rank0(self, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``fn()`` on rank 0, its result handed to every rank; an error there stops all."""
        result: dict[str, Any] | None = None
        failure: BaseException | None = None
        if self.info.is_main:
            try:
                result = fn()
            except BaseException as e:
                failure = e
        if self.group is not None:
            box = [result if failure is None else {"__error__": str(failure)}]
            dist.broadcast_object_list(box, src=0, group=self.group)
            result = box[0]
        if failure is not None:
            raise failure
        assert result is not None
        if "__error__" in result:
            raise PeerError(f"rank 0 failed: {result['__error__']}")
        return result

    def _stage_job_config(
        self, name: str, run_dir: Path, art: Artifact, *, model_from: str = ""
    ) -> JobConfig:
        """The training job of stage ``name``: its config file and ``set`` keys, with the
        pipeline's data, the input's model (``model_from``) and its own run directory."""
        section = getattr(self.cfg, name)
        cls = self._job_cls(name)
        data: dict[str, Any] = {}
        if section.config:
            import tomllib

            try:
                with open(section.config, "rb") as f:
                    data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise UserError(f"{name}.config: {section.config} is not valid TOML: {e}") from None
        data["data"] = to_dict(self.source_cfg)["data"]
        if model_from:
            model_cfg, _ = job_config_of(model_from)
            # the prune job reads its weights from prune.source; the others from init_from
            init = "" if name == "prune" else model_from
            data["model"] = {**to_dict(model_cfg)["model"], "init_from": init}
        for sec, values in parse_overrides([f"--{s}" for s in section.set], cls).items():
            data.setdefault(sec, {}).update(values)
        run = data.setdefault("run", {})
        run.update(out_dir=str(run_dir.parent), name=run_dir.name)
        if name == "distill":
            data.setdefault("distill", {})["teacher"] = art.checkpoint
        elif name == "prune":
            data.setdefault("prune", {})["source"] = art.checkpoint
        cfg = from_dict(data, source=f"stage {name} ({section.config or 'defaults'})", cls=cls)
        cfg.checkpoint.resume = "auto" if self.resume else ""
        return cfg

    def _train(self, name: str, kind: str, cfg: JobConfig) -> Artifact:
        run_dir = cfg.run_dir
        try:
            started = find_checkpoint(run_dir)
        except UserError:
            started = None
        if started is not None and not self.resume:
            raise UserError(
                f"stage {name} was started in {run_dir} and did not finish: pass --resume to "
                f"continue it, or delete {run_dir} to start it again"
            )
        self.runner(cfg, self.info, kind)
        return Artifact(str(find_checkpoint(run_dir)))

    # ------------------------------------------------------------------------------ stages
    def _spec(self, name: str, art: Artifact | None) -> dict[str, Any]:
        section = getattr(self.cfg, name, None)
        values = to_dict(self.cfg)[name] if section is not None else {"source": self.source}
        return {
            "section": values,
            "config_sha256": _sha(getattr(section, "config", "")),
            "input": art.as_dict() if art else None,
        }

    def _finished(self, name: str, spec: dict[str, Any]) -> dict[str, Any] | None:
        path = self.dir / name / STAGE_FILE
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        if record.get("spec") != spec:
            changed = [k for k in spec if record.get("spec", {}).get(k) != spec[k]]
            raise UserError(
                f"stage {name} in {path.parent} was finished with another "
                f"{' and '.join(changed)}: delete {path.parent} (and the stages after it) to "
                f"run it again, or set another pipeline.name"
            )
        return record

    def _source_stage(self) -> dict[str, Any]:
        def measure() -> dict[str, Any]:
            bench = self.bench
            out = self.dir / "source"
            out.mkdir(parents=True, exist_ok=True)
            rows = [bench.model_row("source", Artifact(self.source), out)]
            if "export" in self.cfg.pipeline.stages and "onnx" in self.cfg.export.formats:
                from dtrain.export import ExportFailed, export_onnx

                model = bench.load(Artifact(self.source))
                try:  # the starting model under onnxruntime too: the honest baseline
                    path = export_onnx(model, bench.example, out / "model.onnx")
                except ExportFailed as e:
                    logger.info("source: no ONNX baseline: %s", e)
                else:
                    rows.append(bench.file_row("source (onnx)", "onnx", path, model))
            return {"output": Artifact(self.source).as_dict(), "rows": rows, "details": {}}

        return self._stage("source", None, lambda: self._on_rank0(measure))

    def _stage(
        self, name: str, art: Artifact | None, work: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        spec = self._spec(name, art)
        record = self._on_rank0(lambda: self._finished(name, spec) or {})
        if record:
            logger.info("stage %s: finished before, skipped (%s)", name, self.dir / name)
            return record
        record = {"stage": name, "spec": spec, **work()}

        def save() -> dict[str, Any]:
            atomic_write_text(self.dir / name / STAGE_FILE, json.dumps(record, indent=1) + "\n")
            return record

        return self._on_rank0(save)

    def _rank0_stage(self, fn: Callable[[Path], dict[str, Any]], name: str) -> Callable:
        """``work`` for :meth:`_stage`: ``fn(stage dir)`` on rank 0 (the directory emptied
        first: a post-training stage cut short is redone whole)."""

        def run() -> dict[str, Any]:
            out = self.dir / name
            for child in out.iterdir() if out.is_dir() else []:
                if child.name not in ("finetune", "qat"):  # training runs resume instead
                    (shutil.rmtree if child.is_dir() else Path.unlink)(child)
            out.mkdir(parents=True, exist_ok=True)
            return fn(out)

        return lambda: self._on_rank0(run)

    def run(self) -> list[dict[str, Any]]:
        """Run the stages; returns every measured row (source first), on every rank."""
        if self.info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / "pipeline.toml", to_toml(self.cfg))
        rows = list(self._source_stage()["rows"])
        art = Artifact(self.source)
        for name in self.cfg.pipeline.stages:
            record = self._stage(name, art, functools.partial(self._run_stage, name, art))
            rows += record["rows"]
            if "output" in record and "checkpoint" in record["output"]:
                art = Artifact(**record["output"])
        rounds = self.cfg.pipeline.latency_rounds

        def remeasure() -> dict[str, Any]:
            self.bench.remeasure(rows, rounds=rounds)
            return {"rows": rows}

        return list(self._on_rank0(remeasure)["rows"]) if rounds else rows

    def _run_stage(self, name: str, art: Artifact) -> dict[str, Any]:
        stage_dir = self.dir / name
        batch_size = self.source_cfg.data.batch_size
        details: dict[str, Any] = {}
        if name in ("distill", "prune"):
            model_from = art.checkpoint if name == "prune" else ""
            cfg = self._stage_job_config(name, stage_dir / "run", art, model_from=model_from)
            art = self._train(name, name, cfg)
        elif name == "lowrank":
            factorised = stage_dir / "factorized"

            def factorise(out: Path) -> dict[str, Any]:
                new, info = run_lowrank(self.bench, art, self.cfg.lowrank, factorised)
                return {"output": new.as_dict(), "details": info}

            done = self._rank0_stage(factorise, name)()
            art, details = Artifact(**done["output"]), done["details"]
            if self.cfg.lowrank.finetune:
                cfg = self._stage_job_config(
                    name, stage_dir / "finetune", art, model_from=art.checkpoint
                )
                art = self._train(name, "train", cfg)
        elif name == "quantize":
            q = self.cfg.quantize
            if q.method == "qat":
                cfg = self._stage_job_config(
                    name, stage_dir / "qat", art, model_from=art.checkpoint
                )
                art = self._train(name, "qat", cfg)

            def quantize(out: Path) -> dict[str, Any]:
                new, info = run_quantize(self.bench, art, q, out, batch_size=batch_size)
                return {"output": new.as_dict(), "details": info}

            done = self._rank0_stage(quantize, name)()
            art, details = Artifact(**done["output"]), done["details"]
        else:  # export: its rows are the exported files'

            def export(out: Path) -> dict[str, Any]:
                files, rows, checks = run_export(
                    self.bench, art, self.cfg.export, out, batch_size=batch_size
                )
                return {"output": {"files": files}, "rows": rows, "details": checks}

            return self._rank0_stage(export, name)()

        def measure() -> dict[str, Any]:
            bench = self.bench
            float_model = bench.load(Artifact(art.checkpoint)) if art.quantized else None
            row = bench.model_row(name, art, stage_dir, float_model=float_model)
            return {"output": art.as_dict(), "rows": [row], "details": details}

        return self._on_rank0(measure)


def check(cfg: PipelineFile) -> None:
    """Everything :class:`Pipeline` checks before a stage runs (the source, every training
    stage's job config), without a process group (for launchers and ``--check``)."""
    import torch

    info = DistInfo(0, 1, 0, 1, torch.device("cpu"), "none", "check")
    Pipeline(cfg, info, resume=False, runner=lambda *_: {})
