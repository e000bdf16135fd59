"""Train the digits CNN with PyTorch Lightning and Deep Gradient Compression (``DGCStrategy``).

Two processes on CPU (gloo), or one per GPU::

    .venv/bin/torchrun --nproc_per_node=2 -m dtrain.examples.lightning_digits

``--checkpoint-dir ckpt`` keeps ``ckpt/last.ckpt`` (and every rank's DGC state in
``ckpt/last.ckpt.dgc/``), written after every epoch; ``--resume`` continues from it. Rank 0
prints a summary with the test accuracy (297 held-out images), the compression ratio, the DGC
steps taken and a SHA-256 of the final parameters, which a resumed run shares with an
uninterrupted one.
"""

import argparse
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dtrain.examples.accelerate_digits import digest
from dtrain.examples.digits import Net, accuracy, digits_split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--density", type=float, default=0.001)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--checkpoint-dir", type=Path, help="keep DIR/last.ckpt after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch-size must be >= 1")
    if not 0 < args.density <= 1:
        p.error(f"--density must be in (0, 1], got {args.density}")
    if args.resume and args.checkpoint_dir is None:
        p.error("--resume needs --checkpoint-dir")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from dtrain.comm import DGCState
    from dtrain.integrations.lightning import DGCStrategy

    class Digits(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if not torch.cuda.is_available() and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        torch.set_num_threads(1)  # several processes share this machine's cores
    L.seed_everything(0, verbose=False)
    x_tr, y_tr, x_te, y_te = digits_split()
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=args.batch_size, shuffle=True)
    module = Digits()
    callbacks: list[Callback] = []
    if args.checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, save_last=True))
    strategy = DGCStrategy(dgc={"density": args.density, "warmup_steps": len(x_tr) // 64})
    trainer = L.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        num_nodes=int(os.environ.get("WORLD_SIZE", "1"))
        // int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        strategy=strategy,
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=args.checkpoint_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    ckpt = args.checkpoint_dir / "last.ckpt" if args.resume and args.checkpoint_dir else None
    trainer.fit(module, loader, ckpt_path=ckpt)
    dgc = strategy.dgc
    assert isinstance(dgc, DGCState)  # flat DGC (hierarchical: dgc={"hierarchical_local_size"})
    stats = dgc.stats()
    if trainer.is_global_zero:
        acc = accuracy(module.net, x_te, y_te)
        print(
            f"final test accuracy {acc:.2f}% | compression ratio {stats['ratio_total']:.0f}x | "
            f"dgc steps {dgc.iter} | parameters sha256 {digest(module.net)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
