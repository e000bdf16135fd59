"""A hook wrapper that records what DDP handed to DGC, and an independent reference DGC."""

import math

import torch
import torch.distributed as dist

from dtrain.comm import DGCState, dgc_hook


class Recorder:
    """Wraps a DGCState; keeps each step's local gradients (before the hook) by name."""

    def __init__(self, state: DGCState, names: dict) -> None:
        self.state, self.names, self.grads = state, names, [{}]
        self.buckets: list[list[list[str]]] = [[]]  # per step: each bucket's parameter names

    def next_step(self) -> None:
        self.grads.append({})
        self.buckets.append([])


def recording_hook(rec: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buf, off = bucket.buffer(), 0
    rec.buckets[-1].append([rec.names[p] for p in bucket.parameters()])
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
    rates: list[float] | None = None,
    buckets: list[list[list[str]]] | None = None,
    lr_density_gain: float | None = None,
) -> list[list[dict]]:
    """DGC.md re-computed in one process: ``grads[rank][step][name]`` -> outputs, same layout.

    ``rates`` (one per step): the ``lr_weighted`` mode of docs/modes.md, ``v <- v + r_t * u``
    (Nesterov: ``v <- v + r_t * (g + m * u)``) and sent values divided by ``r_t``; None: the
    paper's ``r_t = 1``. ``buckets`` (per step, each bucket's parameter names): selection
    "bucket", the sum of the parameters' k taken at once from their concatenated residuals (in
    bucket order); None: k per parameter. ``lr_density_gain``: after the warm-up the density
    is ``density * 2^(round(4 * log2(clamp(gain * r_t, 0.1, 1 / density))) / 4)``, at most 1.
    """
    world, steps = len(grads), len(grads[0])
    u = [dict() for _ in range(world)]
    v = [dict() for _ in range(world)]
    outs = [[{} for _ in range(steps)] for _ in range(world)]
    for t in range(steps):
        d = 1.0 if t < start_iter else density
        if start_iter <= t < start_iter + warmup_steps:
            d = max(density, 0.25 ** ((t - start_iter) * 4 // warmup_steps + 1))
        elif t >= start_iter + warmup_steps and lr_density_gain is not None:
            assert rates is not None  # the density follows r_t
            x = min(1 / density, max(0.1, lr_density_gain * rates[t]))
            d = min(1.0, density * 2 ** (round(4 * math.log2(x)) / 4))
        compressed = []  # this step's compressed parameters, momentum-corrected
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
            r_t = 1.0 if rates is None else rates[t]
            for r in range(world):
                gr = g[r]
                if clip_norm is not None:
                    gr = gr * min(1.0, clip_norm / math.sqrt(world) / gr.norm().item())
                ur = momentum * u[r].get(name, torch.zeros(n, dtype=torch.float64)) + gr
                vr = v[r].get(name, torch.zeros(n, dtype=torch.float64))
                u[r][name] = ur
                v[r][name] = vr + r_t * (gr + momentum * ur if nesterov else ur)
            compressed.append(name)
        # selection: per parameter, or per bucket over the concatenation of its compressed ones
        groups = [[c] for c in compressed]
        if buckets is not None and (rates is None or rates[t] != 0):  # rate 0: per tensor
            groups = [[x for x in b if x in compressed] for b in buckets[t]]
        for names in filter(None, groups):
            sizes = [math.prod(shapes[x]) for x in names]
            k = sum(min(s, max(1, math.ceil(round(d * s, 6)))) for s in sizes)
            total = torch.zeros(sum(sizes), dtype=torch.float64)
            for r in range(world):
                vr = torch.cat([v[r][x] for x in names])
                idx = torch.topk(vr.abs(), k).indices
                if r_t > 0:
                    total[idx] += vr[idx] / world / r_t
                    vr[idx] = 0
                pos = 0
                for x, size in zip(names, sizes, strict=True):
                    v[r][x] = vr[pos : pos + size].clone()
                    if masking:
                        u[r][x][idx[(idx >= pos) & (idx < pos + size)] - pos] = 0
                    pos += size
            pos = 0
            for x, size in zip(names, sizes, strict=True):
                for r in range(world):
                    outs[r][t][x] = total[pos : pos + size]
                pos += size
    return outs
