"""Deep Gradient Compression in PyTorch Lightning: :class:`DGCStrategy`.

::

    import lightning as L
    from dtrain.integrations.lightning import DGCStrategy

    strategy = DGCStrategy(dgc={"density": 0.001, "warmup_steps": 200})
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2)  # or "gpu"
    trainer.fit(module, ckpt_path="last")  # resumes the DGC state too

Lightning's ``DDPStrategy(ddp_comm_hook=...)`` registers a communication hook only when the
device is CUDA: on CPU the hook is silently not used. :class:`DGCStrategy` registers DGC itself,
on any device, once the model is wrapped in DDP and the optimizer exists (SGD's momentum moves
into the hook, as with :func:`dtrain.comm.register_dgc`). Lightning writes a checkpoint on rank
0 only, but DGC's residuals differ by rank: every rank's state goes beside the checkpoint file,
into ``<file>.dgc/dgc_state_rank<r>.pt``, and comes back when ``fit`` resumes from that file.
"""

import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

from dtrain.comm import register_dgc
from dtrain.comm.dgc_state import DGCState
from dtrain.comm.hierarchical import HierarchicalDGCState
from dtrain.integrations.accelerate import load_dgc_state, save_dgc_state

__all__ = ["DGCStrategy", "dgc_dir"]


def dgc_dir(checkpoint: str | Path) -> Path:
    """Where the ranks' DGC state of a Lightning checkpoint file lives."""
    return Path(f"{checkpoint}.dgc")


class DGCStrategy(DDPStrategy):
    """Lightning's DDP strategy with the DGC hook.

    Args:
        dgc: :func:`dtrain.comm.register_dgc`'s arguments (``density``, ``warmup_steps``, ...).
            ``grad_scaler`` defaults to the precision plugin's (``precision="16-mixed"``).
        **ddp_kwargs: ``DDPStrategy``'s arguments (not ``ddp_comm_hook``: DDP takes one hook).
    """

    strategy_name = "ddp_dgc"

    def __init__(self, dgc: dict[str, Any] | None = None, **ddp_kwargs: Any) -> None:
        if "ddp_comm_hook" in ddp_kwargs:
            raise ValueError("DGCStrategy registers the DGC hook itself: drop ddp_comm_hook")
        super().__init__(**ddp_kwargs)
        self.dgc_kwargs = dict(dgc or {})
        self.dgc: DGCState | HierarchicalDGCState | None = None
        self._dgc_resume: Path | None = None

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)  # DDP and the optimizers
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if len(self.optimizers) != 1:
            raise ValueError(
                f"DGCStrategy moves one optimizer's momentum into the hook, and "
                f"configure_optimizers returned {len(self.optimizers)}: return one"
            )
        kwargs = dict(self.dgc_kwargs)
        kwargs.setdefault("grad_scaler", getattr(self.precision_plugin, "scaler", None))
        assert isinstance(self.model, torch.nn.Module)
        self.dgc = register_dgc(self.model, self.optimizers[0], **kwargs)
        if self._dgc_resume is not None:
            load_dgc_state(self.dgc, self._dgc_resume)
            self._dgc_resume = None

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        # Every rank reads the file, before setup (DDP); the hook's state loads once it exists.
        self._dgc_resume = dgc_dir(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # rank 0
        if self.dgc is not None:
            save_dgc_state(self.dgc, dgc_dir(filepath))  # every rank

    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            shutil.rmtree(dgc_dir(filepath), ignore_errors=True)
