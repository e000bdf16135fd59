"""A hook wrapper that records what DDP handed to DGC, and an independent reference DGC."""

import math

import torch
import torch.distributed as dist

from dtrain.comm import DGCState, dgc_hook


class Recorder:
    """Wraps a DGCState; keeps each step's local gradients (before the hook) by name."""

    def __init__(self, state: DGCState, names: dict) -> None:
        self.state, self.names, self.grads = state, names, [{}]

    def next_step(self) -> None:
        self.grads.append({})


def recording_hook(rec: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buf, off = bucket.buffer(), 0
    for p in bucket.parameters():
        rec.grads[-1][rec.names[p]] = buf[off : off + p.numel()].clone()
        off += p.numel()
    return dgc_hook(rec.state, bucket)


def reference_dgc(
    grads: list[list[dict]],
    *,
    density: float,
    momentum: float,
    nesterov: bool,
    masking: bool,
    clip_norm: float | None,
    start_iter: int,
    warmup_steps: int,
    min_compress_numel: int,
    shapes: dict,
) -> list[list[dict]]:
    """DGC.md re-computed in one process: ``grads[rank][step][name]`` -> outputs, same layout."""
    world, steps = len(grads), len(grads[0])
    u = [dict() for _ in range(world)]
    v = [dict() for _ in range(world)]
    outs = [[{} for _ in range(steps)] for _ in range(world)]
    for t in range(steps):
        d = 1.0 if t < start_iter else density
        if start_iter <= t < start_iter + warmup_steps:
            d = max(density, 0.25 ** ((t - start_iter) * 4 // warmup_steps + 1))
        for name, shape in shapes.items():
            n = math.prod(shape)
            g = [grads[r][t][name].double() for r in range(world)]
            if t < start_iter or len(shape) <= 1 or n < min_compress_numel:
                gbar = sum(x / world for x in g)
                for r in range(world):
                    ur = u[r].get(name, torch.zeros(n, dtype=torch.float64))
                    ur = momentum * ur + gbar
                    u[r][name] = ur
                    outs[r][t][name] = gbar + momentum * ur if nesterov else ur
                continue
            total = torch.zeros(n, dtype=torch.float64)
            for r in range(world):
                gr = g[r]
                if clip_norm is not None:
                    gr = gr * min(1.0, clip_norm / math.sqrt(world) / gr.norm().item())
                ur = momentum * u[r].get(name, torch.zeros(n, dtype=torch.float64)) + gr
                vr = v[r].get(name, torch.zeros(n, dtype=torch.float64))
                vr = vr + gr + momentum * ur if nesterov else vr + ur
                k = min(n, max(1, math.ceil(round(d * n, 6))))
                idx = torch.topk(vr.abs(), k).indices
                total[idx] += vr[idx] / world
                vr[idx] = 0
                if masking:
                    ur[idx] = 0
                u[r][name], v[r][name] = ur, vr
            for r in range(world):
                outs[r][t][name] = total
    return outs
