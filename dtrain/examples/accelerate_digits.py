"""Train the digits CNN with Hugging Face Accelerate and Deep Gradient Compression.

Two processes on CPU (gloo), or one per GPU (nccl)::

    .venv/bin/accelerate launch --multi_gpu --num_processes 2 -m dtrain.examples.accelerate_digits
    .venv/bin/torchrun --nproc_per_node=2 -m dtrain.examples.accelerate_digits

``--checkpoint-dir ckpt`` saves ``ckpt/epoch_<n>`` after every epoch with
``accelerator.save_state`` (which, once ``register_dgc`` ran, also writes every rank's DGC
state); ``--resume ckpt/epoch_<n>`` continues from one; ``--stop-after N`` ends after epoch N,
as an interrupted run would. Rank 0 prints one line per epoch and a summary with the test
accuracy (297 held-out images), the compression ratio and a SHA-256 of the final parameters,
which a resumed run shares with an uninterrupted one.
"""

import argparse
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dtrain.examples.digits import Net, accuracy, digits_split
from dtrain.integrations.accelerate import register_dgc


class Progress:
    """The epochs done, saved by Accelerate with the rest (``register_for_checkpointing``)."""

    def __init__(self) -> None:
        self.epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--density", type=float, default=0.001)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--hook", choices=("dgc", "allreduce"), default="dgc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", type=Path, help="save DIR/epoch_<n> after every epoch")
    p.add_argument("--resume", type=Path, help="a checkpoint directory to continue from")
    p.add_argument("--stop-after", type=int, help="end after this epoch (an interruption)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.warmup_epochs < 0:
        p.error("--epochs and --batch-size must be >= 1, --warmup-epochs >= 0")
    if not 0 < args.density <= 1:
        p.error(f"--density must be in (0, 1], got {args.density}")
    if args.resume is not None and not args.resume.is_dir():
        p.error(f"--resume {args.resume}: no such checkpoint directory")
    return args


def digest(model: nn.Module) -> str:
    """SHA-256 of the parameters and buffers, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    if not torch.cuda.is_available() and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        torch.set_num_threads(1)  # several processes share this machine's cores
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        # the same shuffles after a resume: the sampler's seed and epoch are saved
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    x_te, y_te = x_te.to(accelerator.device), y_te.to(accelerator.device)
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=args.batch_size, shuffle=True)
    model: nn.Module = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    dgc = None
    if args.hook == "dgc":  # the Accelerate flavour of the two lines
        warmup_steps = round(args.warmup_epochs * len(loader))
        dgc = register_dgc(
            accelerator, model, optimizer, density=args.density, warmup_steps=warmup_steps
        )
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if args.resume is not None:
        accelerator.load_state(str(args.resume))  # model, optimizer, RNG, sampler, DGC state
        accelerator.print(f"resumed from {args.resume} after epoch {progress.epoch}")

    acc, ratio = 0.0, 1.0
    for epoch in range(progress.epoch, args.epochs):
        loader.set_epoch(epoch)
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
        progress.epoch = epoch + 1
        ratio = dgc.stats()["ratio_total"] if dgc is not None else 1.0
        if accelerator.is_main_process:
            acc = accuracy(accelerator.unwrap_model(model), x_te, y_te)
        accelerator.print(
            f"epoch {epoch + 1:3d} | train loss {loss.item():.4f} | test accuracy {acc:6.2f}% "
            f"| compression ratio {ratio:.0f}x",
            flush=True,
        )
        if args.checkpoint_dir is not None:
            accelerator.save_state(str(args.checkpoint_dir / f"epoch_{epoch + 1}"))
        if args.stop_after is not None and epoch + 1 >= args.stop_after:
            break
    accelerator.wait_for_everyone()
    accelerator.print(
        f"final test accuracy {acc:.2f}% | compression ratio {ratio:.0f}x | epochs "
        f"{progress.epoch} | parameters sha256 {digest(accelerator.unwrap_model(model))}",
        flush=True,
    )
    accelerator.end_training()


if __name__ == "__main__":
    main()
