"""Atomic, per-rank checkpoints in the run directory, and resuming from them.

Layout of one checkpoint (``run_dir/checkpoints/step_00000300/``)::

    shared.pt        rank 0: model, optimizer, scheduler, step, epoch, config, ...
    rank_00000.pt    one per rank: RNG states, DGC hook state (residuals differ by rank)
    rank_00001.pt
    COMPLETE         written last, before the directory gets its final name

:meth:`Checkpointer.save` is collective. Everything is written into ``step_XXXXXXXX.tmp/``
(each file to a temporary name, fsynced, then renamed); once every rank has written its file,
rank 0 writes ``COMPLETE`` and renames the directory to its final name. A crash at any point
leaves the previous checkpoint set or the new complete one, never a partial checkpoint that
:meth:`Checkpointer.latest` would return. All files load with ``torch.load(weights_only=True)``.

Example::

    ckpt = Checkpointer(cfg.checkpoint, run_dir, rank=rank, world_size=world)
    if (path := ckpt.resolve_resume()) is not None:
        shared, mine = ckpt.load(path)
        check_compatible(shared["config"], to_dict(cfg))
    ...
    ckpt.save(step, {"model": model.state_dict(), ...}, {"rng": rng_state(), ...})
"""

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dtrain.config import CheckpointConfig
from dtrain.distributed import raise_together
from dtrain.errors import UserError

__all__ = [
    "COMPATIBLE_KEYS",
    "Checkpointer",
    "atomic_torch_save",
    "atomic_write_text",
    "check_compatible",
    "find_checkpoint",
    "load_shared",
    "restore_model",
    "rng_state",
    "save_model_checkpoint",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

FORMAT = "dtrain-checkpoint"
VERSION = 1
COMPLETE = "COMPLETE"
SHARED = "shared.pt"

# Config keys that must match to resume: they define the model's shape, the data it sees and the
# layout of the saved optimizer/hook state. A key ending in "." covers a whole section.
# Hyperparameters (learning rate, weight decay, run.max_steps, run.epochs, ...) may change: a
# resumed run may be extended or fine-tuned; the trainer applies the config's values on resume.
COMPATIBLE_KEYS = (
    "model.",
    "data.name",
    "data.seq_len",
    "data.synthetic_shape",
    "data.synthetic_classes",
    "data.synthetic_size",
    "data.test_fraction",
    "data.image_size",
    "optim.name",
    "optim.decay_norm_and_bias",  # the number of param groups the optimizer state has
    "comm.hook",
    "comm.hierarchical",  # the hook state's layout (whole parameters or shares)
    "engine.",  # DDP or DeepSpeed, its ZeRO partitioning: where the optimizer state lives
)

_STEP_DIR = re.compile(r"step_(\d{8})(\.old)?")


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


# ------------------------------------------------------------------------- durable file writes


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories can't fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any, mode: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one.

    Args:
        path: The file; its directory must exist.
        text: The new contents (UTF-8).
    """
    path = Path(path)
    _atomic_write(path, lambda f: f.write(text), "w")
    _fsync_dir(path.parent)


def _save_tensor_file(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_torch_save(path: Path | str, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` so that readers see the old file or the whole new one
    (its directory must exist)."""
    path = Path(path)
    _save_tensor_file(path, obj)
    _fsync_dir(path.parent)


def _load_tensor_file(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # torch/pickle raise many types for truncated or foreign files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{path} is not a readable dtrain checkpoint file ({reason[:120]}): "
            f"resume from another checkpoint or start a new run"
        ) from None


# ---------------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and ``random`` RNG states, loadable with ``weights_only=True``."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "random": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned.

    CUDA states are restored for the devices present (none on a CPU-only machine).
    """
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    r = state["random"]
    random.setstate((r["version"], tuple(int(v) for v in r["state"].tolist()), r["gauss"]))


# ------------------------------------------------------------------------------ compatibility


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for sec, values in config.items():
        if isinstance(values, dict):
            for key, value in values.items():
                out[f"{sec}.{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def check_compatible(saved_config: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint into a different model, data set, optimizer or hook.

    Args:
        saved_config: The config dict stored in the checkpoint (``dtrain.config.to_dict``).
        config: This job's config dict.

    Raises:
        UserError: Naming the first key of :data:`COMPATIBLE_KEYS` that differs, with both
            values.
    """
    saved, now = _flatten(saved_config), _flatten(config)
    missing = object()
    for key in sorted(set(saved) | set(now)):
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in COMPATIBLE_KEYS):
            continue
        a, b = saved.get(key, missing), now.get(key, missing)
        if a is missing or b is missing:
            continue  # a key added or removed by a newer dtrain: nothing to compare
        if a != b:
            raise UserError(
                f"the checkpoint was saved with {key} = {a!r}, this job has {key} = {b!r}: "
                f"resume with the same model, data, optimizer and hook, or start a new run"
            )


# -------------------------------------------------------------------------------- Checkpointer


class Checkpointer:
    """Writes, finds and reads the checkpoints of one run directory.

    Args:
        cfg: The ``[checkpoint]`` section.
        run_dir: The run directory; checkpoints go to ``run_dir/checkpoints/``. It must be on a
            file system that every rank sees (rank 0 renames the directory the others wrote to).
        rank: This process's rank.
        world_size: Number of ranks.
    """

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, *, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.rank = rank
        self.world_size = world_size
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() != world_size:
            raise ValueError(
                f"world_size={world_size} but the process group has {dist.get_world_size()} ranks"
            )

    # ------------------------------------------------------------------------------- finding

    def _complete(self) -> dict[int, Path]:
        return _complete_in(self.dir)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (by step number), or None."""
        found = self._complete()
        return found[max(found)] if found else None

    def resolve_resume(self) -> Path | None:
        """The checkpoint ``cfg.resume`` asks for, or None to start fresh.

        Raises:
            UserError: ``resume = ""`` but the run directory holds a checkpoint, or the given
                checkpoint directory is missing or incomplete.
        """
        resume = self.cfg.resume
        if resume == "":
            latest = self.latest()
            if latest is not None:
                raise UserError(
                    f"{self.run_dir} already holds a run (checkpoint at step "
                    f"{_step_of(latest)}): pass --resume to continue it, or "
                    f"choose another --run.name"
                )
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not path.is_dir():
            raise UserError(
                f"checkpoint.resume = {resume!r}: no such checkpoint directory (give a "
                f"run_dir/checkpoints/step_XXXXXXXX directory, or 'auto')"
            )
        if not (path / COMPLETE).is_file():
            raise UserError(
                f"checkpoint.resume = {resume!r} is not a complete checkpoint (no {COMPLETE} "
                f"marker): give a run_dir/checkpoints/step_XXXXXXXX directory, or 'auto'"
            )
        return path

    # ------------------------------------------------------------------------------- loading

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read a checkpoint: ``(shared state, this rank's state)``.

        Args:
            path: A complete checkpoint directory, e.g. from :meth:`resolve_resume`.

        Raises:
            UserError: It was saved with another world size, lacks this rank's file, or a file
                is not a dtrain checkpoint (foreign or corrupt).
        """
        path = Path(path)
        if not (path / COMPLETE).is_file():
            raise UserError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        shared = self._read(path / SHARED, rank=None)
        saved_world = shared["world_size"]
        if saved_world != self.world_size:
            raise UserError(
                f"{path} was saved with {saved_world} ranks, this job has {self.world_size}: "
                f"DGC residuals belong to ranks; resume with {saved_world} ranks or start a "
                f"new run"
            )
        mine = self._read(path / _rank_file(self.rank), rank=self.rank)
        return shared["state"], mine["state"]

    def _read(self, file: Path, *, rank: int | None) -> dict[str, Any]:
        return _read_file(file, rank=rank)

    # -------------------------------------------------------------------------------- saving

    def save(
        self,
        step: int,
        shared: dict[str, Any],
        per_rank: dict[str, Any],
        *,
        extra: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write a checkpoint for ``step``; collective, every rank calls it.

        Rank 0 writes ``shared``, every rank its ``per_rank``. Returns once the checkpoint is
        complete on every rank. Saving a step that exists replaces it; older complete
        checkpoints beyond ``cfg.keep``, newer ones (left by a run that was resumed from an
        earlier step) and the remains of interrupted saves are deleted.

        Args:
            step: The optimizer step the state belongs to.
            shared: State that is the same on every rank (only rank 0's is written).
            per_rank: This rank's own state (RNG, DGC residuals).
            extra: Called on every rank with the checkpoint's directory before it is complete,
                to write more files into it (DeepSpeed's engine: its ZeRO partitions).

        Returns:
            The checkpoint directory.

        Raises:
            UserError: A rank could not write (disk full, permissions); every rank raises and
                the previous checkpoints are untouched.
        """
        name = f"step_{step:08d}"
        final, tmp = self.dir / name, self.dir / f"{name}.tmp"

        def prepare() -> None:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

        def write() -> None:
            if extra is not None:
                extra(tmp)
            header = {"format": FORMAT, "version": VERSION, "step": step}
            header["world_size"] = self.world_size
            if self.rank == 0:
                _save_tensor_file(tmp / SHARED, {**header, "rank": None, "state": shared})
            mine = {**header, "rank": self.rank, "state": per_rank}
            _save_tensor_file(tmp / _rank_file(self.rank), mine)

        def publish() -> None:
            missing = [
                f
                for f in [SHARED, *map(_rank_file, range(self.world_size))]
                if not (tmp / f).is_file()
            ]
            if missing:  # a rank wrote somewhere else: the run dir is not on a shared disk
                raise UserError(
                    f"{tmp} lacks {', '.join(missing)} after every rank saved: "
                    f"run.out_dir must be on a file system that every node sees"
                )
            _fsync_dir(tmp)
            marker = json.dumps({"step": step, "world_size": self.world_size}) + "\n"
            atomic_write_text(tmp / COMPLETE, marker)
            old = self.dir / f"{name}.old"
            if final.exists():
                # The step is saved again: the complete "old" copy stands in for it until the
                # new one has its final name (an "old" left by a crash is superseded by final).
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            shutil.rmtree(old, ignore_errors=True)
            self._prune(step)

        self._collective(prepare, step, root_only=True)
        self._collective(write, step, root_only=False)
        self._collective(publish, step, root_only=True)
        if self.rank == 0:
            logger.info("checkpoint written: %s", final)
        return final

    def _prune(self, step: int) -> None:
        complete = self._complete()
        for s, d in complete.items():
            if s > step:
                logger.warning("removing %s: this run was resumed from an earlier step", d)
                shutil.rmtree(d, ignore_errors=True)
        kept = sorted(s for s in complete if s <= step)
        for s in kept[: -self.cfg.keep]:
            shutil.rmtree(complete[s], ignore_errors=True)
        for d in self.dir.iterdir():
            m = re.fullmatch(r"step_\d{8}\.(tmp|old)", d.name)
            if m and d.is_dir() and (m.group(1) == "tmp" or d.with_suffix("").exists()):
                shutil.rmtree(d, ignore_errors=True)
        _fsync_dir(self.dir)

    def _collective(self, fn: Callable[[], None], step: int, *, root_only: bool) -> None:
        """Run ``fn`` (on rank 0 only, or on every rank), then wait until every rank has.

        The wait exchanges a success flag rather than being a bare barrier, so that a rank that
        fails to write makes every rank raise instead of leaving the others waiting forever.
        """
        error: BaseException | None = None
        if self.rank == 0 or not root_only:
            try:
                fn()
            except OSError as e:
                error = UserError(
                    f"cannot write checkpoint step {step} under {self.dir}: {e}: free disk "
                    f"space or choose another run.out_dir"
                )
            except Exception as e:  # every rank must reach the agreement below, or they hang
                error = e
        raise_together(
            error,
            peer_message=f"checkpoint step {step} failed on another rank (see its message); the "
            f"previous checkpoints in {self.dir} are intact",
        )


def _read_file(file: Path, *, rank: int | None) -> dict[str, Any]:
    try:
        obj = _load_tensor_file(file)
    except FileNotFoundError:
        what = "shared state" if rank is None else f"the file of rank {rank}"
        raise UserError(
            f"{file.parent} lacks {file.name} ({what}): the checkpoint is damaged; resume "
            f"from another one or start a new run"
        ) from None
    if not (
        isinstance(obj, dict)
        and obj.get("format") == FORMAT
        and isinstance(obj.get("state"), dict)
        and obj.get("rank") == rank
    ):
        raise UserError(
            f"{file} is not a dtrain checkpoint file: resume from another checkpoint or "
            f"start a new run"
        )
    if obj.get("version", 0) > VERSION:
        raise UserError(f"{file} was written by a newer dtrain: upgrade dtrain to load it")
    return obj


def _complete_in(directory: Path) -> dict[int, Path]:
    """Step -> directory of every complete checkpoint (``.old``: a replace cut short)."""
    found: dict[int, Path] = {}
    if not directory.is_dir():
        return found
    for d in directory.iterdir():
        m = _STEP_DIR.fullmatch(d.name)
        if m and (d / COMPLETE).is_file():
            step = int(m.group(1))
            if not m.group(2) or step not in found:
                found[step] = d
    return found


def find_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint at ``path`` (a ``step_XXXXXXXX`` directory), or the newest
    complete one of the run directory ``path``.

    Raises:
        UserError: ``path`` is neither, or holds no complete checkpoint.
    """
    p = Path(path)
    if (p / COMPLETE).is_file():
        return p
    if p.is_dir() and (p / "checkpoints").is_dir():
        latest = _complete_in(p / "checkpoints")
        if latest:
            return latest[max(latest)]
    raise UserError(
        f"{path} is neither a run directory with a complete checkpoint nor a checkpoint "
        f"directory (run_dir/checkpoints/step_XXXXXXXX)"
    )


def save_model_checkpoint(run_dir: Path | str, shared: dict[str, Any]) -> Path:
    """A complete checkpoint at step 0 in ``run_dir/checkpoints`` holding only ``shared`` (a
    model, its config and architecture; written by one process, no rank files): what a
    post-training step (a factorised model) hands to :func:`load_shared` and
    ``model.init_from``. Atomic: the directory gets its final name once complete."""
    final = Path(run_dir) / "checkpoints" / f"step_{0:08d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    header = {"format": FORMAT, "version": VERSION, "step": 0, "world_size": 1}
    _save_tensor_file(tmp / SHARED, {**header, "rank": None, "state": shared})
    atomic_write_text(tmp / COMPLETE, json.dumps({"step": 0, "world_size": 1}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def load_shared(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(checkpoint directory, shared state)`` of :func:`find_checkpoint`'s checkpoint: the
    model, optimizer, step, config, ... (``torch.load(weights_only=True)``)."""
    ckpt = find_checkpoint(path)
    return ckpt, _read_file(ckpt / SHARED, rank=None)["state"]


def architecture(shared: dict[str, Any]) -> list[Any]:
    """The channel-pruning history a checkpoint's shared state records (``[]``: the model as its
    config builds it): ``architecture`` (every job's checkpoint), else the prune job's own."""
    return list(shared.get("architecture") or shared.get("extensions", {}).get("prune", {})
                .get("history") or [])  # fmt: skip


TRAINING_ONLY = "distill_adapters"
"""A model's submodule that only its training job uses (the distillation adapters): its weights
are saved with the model and left out when another job restores it."""


def restore_model(
    model: Any, shared: dict[str, Any], *, what: str, example_shape: tuple[int, ...]
) -> Any:
    """``model`` (freshly built from its config) with the weights of a checkpoint's shared
    state: first resized to the pruned architecture the state records (:func:`architecture`;
    kept as ``model.pruning_history``), its factorised layers (``lowrank``: ``{name: rank}``,
    kept as ``model.lowrank_ranks``) rebuilt, then loaded strictly.

    Raises:
        UserError: the weights do not fit (``what`` names the checkpoint in the message).
    """
    history = architecture(shared)
    if history:
        from dtrain.pruning.structured import rebuild  # Torch-Pruning: only when needed

        example = torch.zeros(2, *example_shape, dtype=torch.long if len(example_shape) == 1
                              else torch.float32)  # fmt: skip
        rebuild(model, history, example)
    setattr(model, "pruning_history", list(history))  # noqa: B010 (saved with its checkpoints)
    if ranks := dict(shared.get("lowrank") or {}):  # factorised after any channel pruning
        from dtrain.lowrank import apply_ranks

        try:
            apply_ranks(model, ranks)
        except KeyError as e:
            name = type(model).__name__
            raise UserError(
                f"{what} does not fit the model ({name}): it factorised {e}, which the model "
                f"does not have as a Linear layer or 1x1 convolution"
            ) from None
    own = model.state_dict()
    state = {  # a distilled student's adapters train with it and stay behind
        k: v
        for k, v in shared.get("model", {}).items()
        if k in own or not k.startswith(f"{TRAINING_ONLY}.")
    }
    problem = ""
    for k in own:
        if k not in state:
            problem = f"missing {k}"
        elif tuple(state[k].shape) != tuple(own[k].shape):
            problem = f"{k} of shape {list(state[k].shape)} (the model's: {list(own[k].shape)})"
        if problem:
            break
    if not problem and (extra := [k for k in state if k not in own]):
        problem = f"unexpected {extra[0]}"
    if problem:
        name = type(model).__name__
        raise UserError(f"{what} does not fit the model ({name}): {problem}")
    model.load_state_dict(state)
    return model


def _step_of(path: Path) -> int:
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else -1
