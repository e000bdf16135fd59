"""Train a small CNN on scikit-learn's digits with DDP and Deep Gradient Compression.

Two processes on CPU (gloo), or one per GPU (nccl)::

    .venv/bin/torchrun --nproc_per_node=2 -m dtrain.examples.digits
    .venv/bin/torchrun --nproc_per_node=2 -m dtrain.examples.digits --hook allreduce

A single process (world size 1) also works: ``.venv/bin/python -m dtrain.examples.digits``.
Rank 0 prints one line per epoch and a summary line with the test accuracy (297 held-out
images), the compression ratio and the bytes sent.
"""

import argparse
import gc
import logging
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from dtrain.comm import register_dgc


class Net(nn.Module):
    """Two 3x3 convolutions, 2x2 max pooling and two linear layers for 8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--density", type=float, default=0.001)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--hook", choices=("dgc", "allreduce"), default="dgc")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.warmup_epochs < 0:
        p.error("--epochs and --batch-size must be >= 1, --warmup-epochs >= 0")
    if not 0 < args.density <= 1:
        p.error(f"--density must be in (0, 1], got {args.density}")
    return args


def init_distributed(tmp: str) -> torch.device:
    """Join torchrun's group (env vars), or make a 1-rank group; return this rank's device."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:  # torchrun
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        init, rank, world = "env://", int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        local_rank, init, rank, world = 0, f"file://{tmp}/store", 0, 1
    if cuda:
        torch.cuda.set_device(local_rank)
    elif int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        torch.set_num_threads(1)  # several processes share this machine's cores
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world
    )
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return 100.0 * acc


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as 1x8x8 images in [0, 1]: ``x_train, y_train, x_test, y_test``
    (297 held-out images, stratified, the same split on every rank)."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=297, random_state=0, stratify=y)
    return x_tr, y_tr, x_te, y_te


def train(args: argparse.Namespace, device: torch.device, start: float) -> None:
    """Train, printing per-epoch lines and the summary on rank 0 (wall time since ``start``)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x_tr, y_tr, x_te, y_te = digits_split()
    x_te, y_te = x_te.to(device), y_te.to(device)
    train_set = TensorDataset(x_tr, y_tr)
    sampler: DistributedSampler[int] = DistributedSampler(
        train_set, num_replicas=world, rank=rank, seed=args.seed
    )
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)

    torch.manual_seed(args.seed)
    model = DistributedDataParallel(Net().to(device))  # existing DDP code ...
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    dgc = None
    if args.hook == "dgc":  # ... plus the two lines that add DGC:
        warmup_steps = round(args.warmup_epochs * len(loader))
        dgc = register_dgc(model, optimizer, density=args.density, warmup_steps=warmup_steps)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    ratio, sent, dense = 1.0, 0.0, 0.0
    acc = 0.0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        loss_sum = torch.zeros(2, device=device)  # summed loss, samples
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum[0] += loss.detach() * len(yb)
            loss_sum[1] += len(yb)
        dist.all_reduce(loss_sum)
        if dgc is not None:
            s = dgc.stats()
            ratio, sent, dense = s["ratio_total"], s["bytes_sent_total"], s["dense_bytes_total"]
        else:  # plain DDP: every step allreduces every gradient
            sent = dense = float((epoch + 1) * len(loader) * param_bytes)
        if rank == 0:
            acc = accuracy(model.module, x_te, y_te)
            loss_avg = (loss_sum[0] / loss_sum[1]).item()
            print(
                f"epoch {epoch + 1:3d} | train loss {loss_avg:.4f} | test accuracy {acc:6.2f}% "
                f"| compression ratio {ratio:.0f}x",
                flush=True,
            )
    if rank == 0:
        print(
            f"final test accuracy {acc:.2f}% | compression ratio {ratio:.0f}x "
            f"| bytes sent {sent / 1e6:.3f} MB vs dense {dense / 1e6:.3f} MB "
            f"| wall {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    # Drop DDP and the hook state before the group goes: otherwise gloo sometimes aborts at
    # interpreter exit ("terminate called without an active exception").
    del model, optimizer, dgc
    gc.collect()


def main(argv: list[str] | None = None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    with tempfile.TemporaryDirectory() as tmp:
        device = init_distributed(tmp)
        try:
            train(args, device, start)
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
