"""The training loop shared by the jobs: data → DDP model → hook → optimizer, with evaluation,
metrics and checkpoints.

:class:`Trainer` wires components, each built from its own config section: data
(:mod:`dtrain.data`), model (:mod:`dtrain.models`), optimizer and schedule (:mod:`dtrain.optim`),
the communication hook (:mod:`dtrain.comm`), checkpoints (:mod:`dtrain.checkpoint`) and metrics
(:mod:`dtrain.metrics`). Everything that can be wrong with the user's input is checked in
``__init__``, before anything is written; :meth:`Trainer.train` then runs to ``total_steps``.
"""

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dtrain import engine as ds_engine
from dtrain.checkpoint import (
    Checkpointer,
    atomic_write_text,
    check_compatible,
    load_shared,
    restore_model,
    rng_state,
    set_rng_state,
)
from dtrain.comm import make_hook, register_dgc, sparsify
from dtrain.comm.buffers import flat_view, sliced_state
from dtrain.comm.counting import counted
from dtrain.config import CommConfig, JobConfig, to_dict, to_toml
from dtrain.data import DataInfo, ShardedLoader, load_data
from dtrain.distributed import DistInfo, raise_together
from dtrain.errors import UserError
from dtrain.metrics import MetricsLogger, NullLogger, check_wandb, make_logger
from dtrain.models import build_model
from dtrain.optim import build_optimizer, build_scheduler, schedule

__all__ = ["Extension", "ModelSource", "Trainer", "check_run_dir", "plan_batches"]

logger = logging.getLogger(__name__)

DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"  # the engine's files in a checkpoint
_VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _carries(c: CommConfig) -> bool:
    """Whether the hook's state is DGC's flat per-parameter state, which can be sliced (the
    hierarchical hook assigns parameters to local ranks by size: a resized model changes it)."""
    return c.hook == "dgc" and not c.hierarchical


def _sliced(
    state: dict[str, Any], new: torch.Tensor, carry: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Any]:
    """One parameter's optimizer state (momentum buffers: its shape) for its resized tensor
    ``new``: the entries at the kept positions; other entries (the step count) as they are."""
    old, at = carry
    out: dict[str, Any] = {}
    for k, t in state.items():
        if isinstance(t, torch.Tensor) and t.shape == old.shape:
            s = torch.empty_like(new)
            flat_view(s).copy_(flat_view(t)[at.to(t.device)])
            t = s
        out[k] = t
    return out


def plan_batches(batch_size: int, *, world_size: int, grad_accum: int) -> int:
    """Per-rank micro-batch size for a global ``batch_size``, or UserError if it does not divide."""
    parts = world_size * grad_accum
    if batch_size % parts:
        raise UserError(
            f"data.batch_size = {batch_size} is not divisible by world size {world_size} x "
            f"run.grad_accum {grad_accum} = {parts}: use a multiple of {parts}"
        )
    return batch_size // parts


def check_run_dir(run_dir: Path) -> None:
    """UserError unless ``run_dir`` exists as a writable directory or can be created."""
    probe = run_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"run directory {run_dir}: {probe} is a file; choose another run.out_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"run directory {run_dir}: {probe} is not writable; set run.out_dir")


ModelSource = Callable[[JobConfig, DataInfo], nn.Module]
"""Builds the job's model (on the CPU, before DDP), e.g. from another run's checkpoint; may raise
:class:`~dtrain.errors.UserError`. Default: :func:`dtrain.models.build_model`."""


def initial_model(cfg: JobConfig, info: DataInfo) -> nn.Module:
    """The default model source: ``cfg.model`` freshly built, or with the weights (and pruned
    architecture) of ``model.init_from``."""
    model = build_model(cfg.model, info)
    if cfg.model.init_from:
        ckpt, shared = load_shared(cfg.model.init_from)
        model = restore_model(
            model, shared, what=f"model.init_from {ckpt}", example_shape=info.in_shape
        )
    return model


class Extension:
    """A job's hooks into the shared loop (every method optional; all ranks call them alike).

    ``name`` keys the extension's :meth:`state_dict` in the checkpoint's shared state (rank 0's),
    which :meth:`load_state_dict` gets back on resume, before :meth:`on_start`.
    """

    name = "extension"

    def check(self, trainer: "Trainer", model: nn.Module) -> None:
        """Validate the job's own input against the model and the run (``trainer.total_steps``,
        ``trainer.data``); raise :class:`~dtrain.errors.UserError`. Runs before anything is
        written, also under ``--check``."""

    def resume_model(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        """On resume, before the checkpoint's weights load: the model they fit (e.g. rebuilt
        to a pruned architecture from ``state``, this extension's saved state)."""
        return model

    def on_start(self, trainer: "Trainer") -> None:
        """Once the model, DDP, optimizer and hook are built (and the checkpoint loaded)."""

    def after_step(self, trainer: "Trainer") -> None:
        """After each optimizer step; ``trainer.step`` counts the steps taken."""

    def metrics(self, trainer: "Trainer") -> dict[str, float]:
        """Values logged beside each train line (every ``logging.every_steps``) as their own
        kind, this extension's ``name`` (``prune/sparsity`` in wandb). Every rank calls it at
        the same steps (a collective such as :meth:`Trainer.all_mean` is allowed); rank 0's
        values are logged."""
        return {}

    def loss(
        self, trainer: "Trainer", x: torch.Tensor, out: torch.Tensor, y: torch.Tensor,
        loss: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """The training loss of one micro-batch (inputs ``x``, the DDP model's output ``out``,
        labels ``y``; ``trainer.batch_indices``: their rows in ``trainer.data.x_train``, on the
        CPU), given ``loss``, the cross-entropy (or the previous extension's): what is
        back-propagated (e.g. a distillation loss). The logged loss stays the cross-entropy."""
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values saved with every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The :meth:`state_dict` of the checkpoint resumed from."""


class Trainer:
    """Builds every component of a training job and runs its loop.

    Args:
        cfg: the job's resolved config.
        info: this process's place in the job (from :func:`dtrain.distributed.init_distributed`).
        check_only: validate everything (config, data, batch split, run directory, checkpoint to
            resume) without building the process-group-dependent parts, then stop.
        model_source: builds the model (default: from ``cfg.model``, freshly initialised).
        extensions: the job's :class:`Extension` objects, called in order.
    """

    def __init__(
        self,
        cfg: JobConfig,
        info: DistInfo,
        *,
        check_only: bool = False,
        model_source: ModelSource | None = None,
        extensions: Sequence[Extension] = (),
    ) -> None:
        self.cfg, self.info = cfg, info
        self.model_source = model_source or initial_model
        self.extensions = list(extensions)
        # Some checks can fail on one rank alone (its data path, its checkpoint file): every rank
        # learns of it here, so none is left waiting for a peer in DDP's first collective.
        error = None
        try:
            model = self._check_inputs()
        except Exception as e:
            error = e
        if check_only:
            if error is not None:
                raise error
            return
        raise_together(error)
        self._build(model)

    def _check_inputs(self) -> nn.Module:
        """Everything that can be wrong with the user's input, before anything is written: the
        run directory, the data, the batch split, the checkpoint to resume; returns the model."""
        cfg, info = self.cfg, self.info
        run = cfg.run
        self.run_dir = cfg.run_dir
        check_run_dir(self.run_dir)
        if run.precision == "fp16" and info.device.type == "cpu":
            raise UserError("run.precision = 'fp16' needs a GPU; on CPU use bf16 or fp32")

        # ---- data ----
        self.data = load_data(cfg.data, seed=run.seed)
        dinfo = self.data.info
        micro = plan_batches(
            cfg.data.batch_size, world_size=info.world_size, grad_accum=run.grad_accum
        )
        self.ds_config: dict[str, Any] | None = None  # engine.name = "deepspeed": its config
        if cfg.engine.name == "deepspeed":
            ds_engine.check_deepspeed()
            self.ds_config = ds_engine.deepspeed_config(cfg, micro_batch=micro)
        self.train_loader = ShardedLoader(
            self.data.x_train,
            self.data.y_train,
            batch_size=micro,
            rank=info.rank,
            world_size=info.world_size,
            seed=run.seed,
            augment=self.data.augment,
        )
        self.test_loader = ShardedLoader(
            self.data.x_test,
            self.data.y_test,
            batch_size=cfg.data.eval_batch_size,
            rank=info.rank,
            world_size=info.world_size,
            seed=run.seed,
            shuffle=False,
            drop_last=False,
        )
        self.steps_per_epoch = len(self.train_loader) // run.grad_accum
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the training set ({dinfo.train_size} samples) is smaller than one step's "
                f"batch (data.batch_size = {cfg.data.batch_size}): lower data.batch_size"
            )
        self.total_steps = run.max_steps or math.ceil(run.epochs * self.steps_per_epoch)

        # ---- model ----
        torch.manual_seed(run.seed)
        model = self.model_source(cfg, dinfo)
        self.bn_scales = [
            m.weight
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
        ]
        if cfg.optim.bn_l1 > 0 and not self.bn_scales:
            raise UserError(
                f"optim.bn_l1 = {cfg.optim.bn_l1} (Network Slimming) needs batch norm layers, "
                f"and {cfg.model.name} has none: use a model with them or set optim.bn_l1 = 0"
            )

        # ---- checkpoint to resume from ----
        self.checkpointer = Checkpointer(
            cfg.checkpoint, self.run_dir, rank=info.rank, world_size=info.world_size
        )
        self.resume_path = self.checkpointer.resolve_resume()
        self.resumed: tuple[dict, dict] | None = None
        if self.resume_path is not None:
            shared, mine = self.checkpointer.load(self.resume_path)
            check_compatible(shared["config"], to_dict(cfg))
            self.resumed = (shared, mine)
        if info.is_main:
            check_wandb(cfg.logging)
        if cfg.comm.hierarchical:
            info.hierarchical_local_size()  # equal, consecutive ranks per node, or one line
        for e in self.extensions:
            e.check(self, model)
        return model

    def _build(self, model: nn.Module) -> None:
        """DDP, optimizer, hook and schedule; the checkpoint's state loaded into them."""
        cfg, info = self.cfg, self.info
        run = cfg.run
        dinfo = self.data.info
        logger.info(
            "%s: %d train / %d test samples; %s: %s parameters; %d steps of %d per epoch; "
            "%d micro-batch(es) of %d per rank per step",
            cfg.data.name,
            dinfo.train_size,
            dinfo.test_size,
            cfg.model.name,
            f"{sum(p.numel() for p in model.parameters()):,}",
            self.total_steps,
            self.steps_per_epoch,
            run.grad_accum,
            self.train_loader.batch_size,
        )

        # ---- DDP, optimizer, hook ----
        if self.resumed:
            saved = self.resumed[0].get("extensions", {})
            for ext in self.extensions:  # e.g. a pruned architecture, before its weights load
                if ext.name in saved:
                    model = ext.resume_model(model, saved[ext.name])
        model.to(info.device)
        if self.resumed:
            model.load_state_dict(self.resumed[0]["model"])
        self.model = model
        self.scaler = torch.amp.GradScaler("cuda") if run.precision == "fp16" else None
        self.step = 0
        self.batch_indices: torch.Tensor | None = None  # the micro-batch's rows (extensions)
        self.step_lr = 0.0  # the learning rate of the last step taken
        self._wire()
        if self.resumed:
            self._load(*self.resumed)
        else:
            torch.manual_seed(run.seed * 1000 + info.rank)  # dropout differs by rank
        self.resumed = None  # the checkpoint's tensors are not needed any more
        for e in self.extensions:
            e.on_start(self)

    def _wire(self) -> None:
        """DDP around ``self.model``, a new optimizer, hook and LR schedule at ``self.step``."""
        cfg, info = self.cfg, self.info
        cuda = info.device.type == "cuda"
        self.optimizer = build_optimizer(cfg.optim, self.model)
        if self.ds_config is not None:
            self.ddp = ds_engine.initialize(
                self.model, self.optimizer, self.ds_config,
                device=info.device, local_rank=info.local_rank,
            )  # fmt: skip
        else:
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[info.device.index] if cuda else None,
                bucket_cap_mb=cfg.comm.bucket_cap_mb,
            )
        self.hook_state = self._register_hook(cfg.comm)
        self.scheduler = build_scheduler(
            cfg.optim,
            self.optimizer,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
        )
        for g, f in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas, strict=True):
            g["lr"] = g["initial_lr"] * f(self.step)  # the schedule at this step
        self.scheduler.last_epoch = self.step
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def rebuild(self, carry: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """After a structural change of ``self.model`` (its modules replaced or resized in
        place, the same way on every rank): a new DDP, optimizer, hook and learning-rate
        schedule at the current step, on every rank. DDP must be rebuilt: the old one keeps
        reducing the old parameters and the ranks silently diverge.

        Args:
            carry: ``{parameter name: (the parameter before the change, the flat positions, in
                memory order, of its entries that remain)}``: the optimizer's state and the DGC
                hook's momentum, residual and decay momentum of those entries carry over,
                sliced like the weights. Without it (and for the state of PowerSGD and the
                hierarchical DGC hook) they start empty.
        """
        carry = carry or {}
        # (under ZeRO 1-2 the optimizer's state is keyed by its flat partitions: it restarts)
        old_opt = {n: self.optimizer.state.get(p, {}) for n, (p, _) in carry.items()}
        old_hook = self.hook_state.state_dict() if carry and _carries(self.cfg.comm) else None
        if self.ds_config is not None:
            ds_engine.release(self.ddp)
        for name in ("ddp", "optimizer", "scheduler", "hook_state"):
            self.__dict__.pop(name, None)
        self.model.to(self.info.device)
        self.model.zero_grad(set_to_none=True)  # e.g. a criterion's; an engine would add to them
        self._wire()
        params = dict(self.model.named_parameters())
        for name, state in old_opt.items():
            if state and name in params:
                self.optimizer.state[params[name]] = _sliced(state, params[name], carry[name])
        if old_hook is not None:
            kept = {n: at for n, (_, at) in carry.items()}
            self.hook_state.load_state_dict(sliced_state(old_hook, kept))
        logger.info(
            "rebuilt DDP, optimizer and %s hook at step %d: %s parameters%s",
            self.cfg.comm.hook, self.step, f"{sum(p.numel() for p in self.model.parameters()):,}",
            "; their state carried over" if carry else "",
        )  # fmt: skip

    # ------------------------------------------------------------------ set-up helpers
    def _register_hook(self, c: CommConfig) -> Any:
        deepspeed = self.ds_config is not None
        if c.hook == "dgc":
            warmup = c.warmup_steps or round(c.warmup_epochs * self.steps_per_epoch)
            density, warmup, gain = self._dgc_density(warmup)
            if deepspeed:
                from dtrain.integrations import deepspeed as ds

                register: Any = ds.register_dgc
                args: tuple = (self.ddp,)
            else:
                register, args = register_dgc, (self.ddp, self.optimizer)
            return register(
                *args,
                **({} if deepspeed else {"grad_scaler": self.scaler}),
                density=density,
                mode=c.mode,
                selection=c.selection,
                lr_density_gain=gain,
                momentum_masking=None
                if c.momentum_masking == "auto"
                else c.momentum_masking == "true",
                clip_norm=c.clip_norm or None,
                start_iter=c.start_iter,
                warmup_steps=warmup,
                warmup_stages=c.warmup_stages,
                exact_topk=c.exact_topk,
                sample_ratio=c.sample_ratio,
                min_compress_numel=c.min_compress_numel,
                value_dtype=_VALUE_DTYPES[c.value_dtype],
                exchange=c.exchange,
                weight_decay=c.weight_decay,
                hierarchical_local_size=self.info.hierarchical_local_size()
                if c.hierarchical
                else None,
            )
        if deepspeed:  # DeepSpeed's own reduction (comm.hook = "allreduce"), counted
            from dtrain.integrations.deepspeed import count_reduction

            return count_reduction(self.ddp)
        kwargs: dict[str, Any] = {}
        if c.hook == "powersgd":
            kwargs = {
                "matrix_approximation_rank": c.powersgd_rank,
                "start_powerSGD_iter": c.powersgd_start_iter,
            }
        inner, hook = make_hook(c.hook, **kwargs)
        state, wrapped = counted(c.hook, inner, hook)
        self.ddp.register_comm_hook(state, wrapped)
        return state

    def _load(self, shared: dict, mine: dict) -> None:
        # The config's learning rate and weight decay win over the checkpoint's (a resumed run
        # may be fine-tuned); with the same config the values are the same, bit for bit.
        base_lrs = list(self.scheduler.base_lrs)
        # the decay, and what register_dgc moved into the hook (dgc_*: from this config too)
        decays = [
            {k: v for k, v in g.items() if k == "weight_decay" or k.startswith("dgc_")}
            for g in self.optimizer.param_groups
        ]
        if self.ds_config is not None:  # the engine's own files: its ZeRO partitions
            assert self.resume_path is not None
            self.ddp.load_checkpoint(
                str(self.resume_path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                load_lr_scheduler_states=False,
            )  # fmt: skip
        else:
            self.optimizer.load_state_dict(shared["optimizer"])  # new param group dicts
        groups = self.optimizer.param_groups
        self.scheduler.load_state_dict(shared["scheduler"])
        self.scheduler.base_lrs = base_lrs
        lrs = [
            b * f(self.scheduler.last_epoch)
            for b, f in zip(base_lrs, self.scheduler.lr_lambdas, strict=True)
        ]
        for g, lr0, lr, wd in zip(groups, base_lrs, lrs, decays, strict=True):
            g.update(initial_lr=lr0, lr=lr, **wd)
        self.scheduler._last_lr = lrs
        if self.scaler is not None and shared.get("scaler"):
            self.scaler.load_state_dict(shared["scaler"])
        try:
            self.hook_state.load_state_dict(mine["hook"])
        except (ValueError, KeyError) as e:  # the same on every rank: another node layout
            raise UserError(
                f"the checkpoint's {self.cfg.comm.hook} hook state does not fit this job ({e}): "
                f"resume with the ranks per node it was saved with, or start a new run"
            ) from None
        set_rng_state(mine["rng"])
        self.step = int(shared["step"])
        saved = shared.get("extensions", {})
        for ext in self.extensions:
            if ext.name not in saved:
                raise UserError(
                    f"{self.resume_path} holds no {ext.name} state: it was written by another "
                    f"job; resume it with that job, or start a new run"
                )
            ext.load_state_dict(saved[ext.name])
        logger.info("resumed from %s at step %d", self.resume_path, self.step)

    def weights_changed(self) -> None:
        """Call after changing the model's weights in place (masks, a rewind): the engine's own
        copies follow (ZeRO's fp32 master partition; DDP has none)."""
        if self.ds_config is not None:
            ds_engine.weights_changed(self.ddp)

    def _checkpoint(self) -> None:
        deepspeed = self.ds_config is not None
        shared = {
            # (ZeRO-3: gathered, on every rank)
            "model": ds_engine.model_state(self.ddp) if deepspeed else self.model.state_dict(),
            # under DeepSpeed the engine saves the optimizer (partitioned by ZeRO) itself
            "optimizer": {} if deepspeed else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "batch_in_epoch": (self.step % self.steps_per_epoch) * self.cfg.run.grad_accum,
            "config": to_dict(self.cfg),
            "world_size": self.info.world_size,
            "extensions": {e.name: e.state_dict() for e in self.extensions},
            # a channel-pruned architecture: how to rebuild it (checkpoint.restore_model)
            "architecture": list(getattr(self.model, "pruning_history", [])),
            "lowrank": dict(getattr(self.model, "lowrank_ranks", {})),  # factorised layers
            # what another job (a distillation's teacher) checks against its data
            "num_classes": self.data.info.num_classes,
            "vocab": self.data.vocab,  # a text model's characters
        }
        mine = {"hook": self.hook_state.state_dict(), "rng": rng_state()}

        def engine_files(directory: Path) -> None:  # collective: every rank writes its part
            self.ddp.save_checkpoint(
                str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False
            )

        self.checkpointer.save(self.step, shared, mine, extra=engine_files if deepspeed else None)

    # ------------------------------------------------------------------ one step
    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean loss, number of correct predictions, number of predictions."""
        out = out.reshape(-1, out.shape[-1]).float()
        y = y.reshape(-1)
        return F.cross_entropy(out, y), (out.argmax(1) == y).sum(), y.numel()

    def _dgc_density(self, warmup: int) -> tuple[float, int, float | None]:
        """DGC's ``(density, warmup_steps, lr_density_gain)`` by comm.density_schedule
        (:func:`~dtrain.comm.sparsify.plan_density`); ``auto``: ``budget`` in lr_weighted mode
        with SGD (LSTM, 3,000 steps: +2.9% of dense perplexity against +5.5% for ``lr`` and +6.2%
        for ``constant``, the same pairs; docs/modes.md), else ``constant``."""
        c, o = self.cfg.comm, self.cfg.optim
        how = c.density_schedule
        if how == "auto":
            how = "budget" if c.mode == "lr_weighted" and o.name == "sgd" else "constant"
        total = self.total_steps
        factor = schedule(o, total_steps=total, steps_per_epoch=self.steps_per_epoch)
        density, warmup, gain = sparsify.plan_density(
            how, c.density, factor=factor, total_steps=total, start_iter=c.start_iter,
            warmup_steps=warmup, warmup_stages=c.warmup_stages,
        )  # fmt: skip
        if gain is not None and self.info.rank == 0:
            first = c.start_iter + warmup
            logger.info(
                "DGC density follows the learning rate (%s): mean %.5g over steps %d-%d, "
                "gain %.4g, from %.5g to %.5g",
                how, density, first, total, gain,
                sparsify.lr_density(density, factor(first), gain),
                sparsify.lr_density(density, factor(total - 1), gain),
            )  # fmt: skip
        return density, warmup, gain

    def _flush_at_end(self) -> bool:
        """Whether the DGC residuals go into the weights after the last step (comm.flush).

        ``auto``: in lr_weighted mode once the schedule has annealed (the last step's rate at
        most a tenth of ``optim.lr``): then the residuals hold work the high-rate steps earned
        and never applied (LSTM, cosine: -1% perplexity). At a rate that stayed high they hold
        a large, stale step: flushed, the digits example fell from 82.5% to 74.7% accuracy.
        """
        c = self.cfg.comm
        if c.hook != "dgc" or not isinstance(self.optimizer, torch.optim.SGD):
            return False
        annealed = self.step_lr <= 0.1 * self.cfg.optim.lr
        return c.flush == "true" or (c.flush == "auto" and c.mode == "lr_weighted" and annealed)

    def _flush(self) -> None:
        if self.ds_config is not None:  # into the ZeRO optimizer's fp32 master copy too
            from dtrain.integrations.deepspeed import flush

            flush(self.ddp, self.hook_state)
        else:
            self.hook_state.flush()

    def _autocast(self) -> contextlib.AbstractContextManager:
        p = self.cfg.run.precision
        if p == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        return torch.autocast(self.info.device.type, dtype=dtype)

    def _train_step(self, batches: Any, window: torch.Tensor) -> None:
        accum = self.cfg.run.grad_accum
        engine = self.ds_config is not None
        if not engine:
            self.optimizer.zero_grad(set_to_none=True)
        for i in range(accum):
            x, y, self.batch_indices = next(batches)
            x, y = x.to(self.info.device), y.to(self.info.device)
            last = i == accum - 1
            sync = contextlib.nullcontext() if last or engine else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    out = self.ddp(x)
                loss, correct, count = self._loss(out, y)
                train_loss = loss
                for e in self.extensions:
                    train_loss = e.loss(self, x, out, y, train_loss)
                scaled = train_loss / accum
                if self.cfg.optim.bn_l1 > 0:  # Network Slimming's sparsity on BN scales
                    l1 = torch.stack([g.abs().sum() for g in self.bn_scales]).sum()
                    scaled = scaled + self.cfg.optim.bn_l1 * l1 / accum
                if engine:  # DeepSpeed divides by its gradient_accumulation_steps itself
                    self.ddp.backward(scaled * accum)
                    self.ddp.step()  # the optimizer step (and clipping) at the boundary only
                else:
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            # On the device: no host sync per step (read at log steps only).
            window[0] += loss.detach().double() * count
            window[1] += correct
            window[2] += count
        if not engine:  # (DeepSpeed's engine stepped above, clipping included)
            self._step_optimizer()
        self.step_lr = float(self.scheduler.get_last_lr()[0])  # what this step used (for the log)
        self.scheduler.step()

    def _step_optimizer(self) -> None:
        clip = self.cfg.optim.clip_grad_norm
        if self.scaler is not None:
            if clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()

    # ------------------------------------------------------------------ metrics
    def all_mean(self, values: list[float]) -> list[float]:
        """The mean of ``values`` over the ranks (a collective: every rank calls it)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.info.device)
        dist.all_reduce(t)
        return (t / self.info.world_size).tolist()

    def _comm_metrics(self) -> dict[str, float]:
        s = self.hook_state.stats()
        keys = ("bytes_sent", "dense_bytes", "bytes_sent_total", "dense_bytes_total")
        vals = dict(zip(keys, self.all_mean([float(s[k]) for k in keys]), strict=True))
        vals["ratio"] = vals["dense_bytes"] / vals["bytes_sent"] if vals["bytes_sent"] else 0.0
        vals["ratio_total"] = (
            vals["dense_bytes_total"] / vals["bytes_sent_total"]
            if vals["bytes_sent_total"]
            else 0.0
        )
        vals["density"] = float(s["density"])
        return vals

    def _metric(self, mean_loss: float, correct: float, count: float, prefix: str = "") -> dict:
        out = {f"{prefix}loss": mean_loss}
        if self.data.info.metric == "perplexity":
            out[f"{prefix}perplexity"] = math.exp(min(mean_loss, 50.0))
        else:
            out[f"{prefix}accuracy"] = 100.0 * correct / max(count, 1.0)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy (or perplexity) over the whole held-out set, every sample once."""
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for x, y in self.test_loader.eval_batches():
            x, y = x.to(self.info.device), y.to(self.info.device)
            with self._autocast():
                out = self.model(x)
            loss, correct, count = self._loss(out, y)
            sums += torch.tensor([loss.item() * count, correct.item(), float(count)])
        self.model.train()
        t = sums.to(self.info.device)
        dist.all_reduce(t)
        total_loss, correct, count = t.tolist()
        return self._metric(total_loss / max(count, 1.0), correct, count, prefix="test_")

    # ------------------------------------------------------------------ the loop
    def _open_run_dir(self) -> MetricsLogger | NullLogger:
        """Rank 0 creates the run directory, starts the metrics logger (and wandb, which may
        fail) and writes the resolved config; a directory this call created is removed again
        if that fails. Every rank learns whether it worked."""
        error, metrics = None, NullLogger()
        created = None  # the outermost directory this call makes, if any
        for d in (self.run_dir, *self.run_dir.parents):
            if d.exists():
                break
            created = d
        if self.info.is_main:
            try:
                metrics = make_logger(
                    self.cfg.logging,
                    self.run_dir,
                    rank=self.info.rank,
                    config=to_dict(self.cfg),
                    total_steps=self.total_steps,
                    start_step=self.step,
                    resume=self.resume_path is not None,
                )
                atomic_write_text(self.run_dir / "config.toml", to_toml(self.cfg))
            except Exception as e:
                error = e
                metrics.close(failed=True)
                if created is not None:
                    shutil.rmtree(created, ignore_errors=True)
        raise_together(error)
        return metrics

    def train(self) -> dict[str, Any]:
        """Train to ``total_steps``, logging, evaluating and checkpointing; returns the summary."""
        cfg, spe = self.cfg, self.steps_per_epoch
        start_time = time.perf_counter()
        metrics = self._open_run_dir()
        window = torch.zeros(3, dtype=torch.float64, device=self.info.device)
        window_start, window_steps = time.perf_counter(), 0
        evaluated: dict[str, float] = {}
        self.model.train()
        with metrics:
            while self.step < self.total_steps:
                epoch, pos = divmod(self.step, spe)
                batches = self.train_loader.epoch_batches(
                    epoch, start=pos * cfg.run.grad_accum, indices=True
                )
                for _ in range(pos, spe):
                    if self.step >= self.total_steps:
                        break
                    self._train_step(batches, window)
                    self.step += 1
                    for e in self.extensions:
                        e.after_step(self)
                    window_steps += 1
                    last = self.step == self.total_steps
                    if last and self._flush_at_end():
                        # what the residuals still hold, into the weights; the log shows both
                        before = self.evaluate()
                        metrics.log(self.step, before, kind="pre_flush")
                        self._flush()
                    evaluated = {}
                    if self.step % cfg.logging.every_steps == 0 or last:
                        elapsed = time.perf_counter() - window_start
                        loss_sum, correct, count = self.all_mean(window.tolist())
                        line = self._metric(loss_sum / max(count, 1.0), correct, count)
                        samples = cfg.data.batch_size * window_steps
                        line.update(
                            lr=self.step_lr,
                            samples_per_s=samples / elapsed,
                            step_time_s=elapsed / window_steps,
                            epoch=self.step / spe,
                            **self._comm_metrics(),
                        )
                        metrics.log(self.step, line)
                        for e in self.extensions:
                            if values := e.metrics(self):
                                metrics.log(self.step, values, kind=e.name)
                        window.zero_()
                        window_start, window_steps = time.perf_counter(), 0
                    every = cfg.run.eval_every
                    if self.step % (every or spe) == 0 or last:
                        evaluated = self.evaluate()
                        metrics.log(self.step, {**evaluated, "epoch": self.step / spe}, kind="eval")
                    ck = cfg.checkpoint.every_steps
                    if (ck and self.step % ck == 0) or last:
                        self._checkpoint()
                    metrics.advance()
            if not evaluated:  # resumed at the end: evaluate what was saved
                evaluated = self.evaluate()
            comm = self._comm_metrics()
            summary: dict[str, Any] = {
                **evaluated,
                "steps": self.step,
                "bytes_sent_total": comm["bytes_sent_total"],
                "dense_bytes_total": comm["dense_bytes_total"],
                "ratio_total": comm["ratio_total"],
                "wall_seconds": time.perf_counter() - start_time,
                "world_size": self.info.world_size,
                "hook": cfg.comm.hook,
            }
            metrics.summary(summary)
        return summary

    def close(self) -> None:
        """Drop DDP, the hook state and the optimizer (before the process group goes)."""
        for name in ("ddp", "model", "optimizer", "scheduler", "hook_state", "scaler", "data"):
            self.__dict__.pop(name, None)
