"""The integrations' pure parts: DeepSpeed's buckets for the DGC hook, Accelerate's refusals."""

import pytest
import torch
from torch import nn

from dtrain.comm.buffers import FlatBucket
from dtrain.integrations.deepspeed import _buckets


def test_buckets_hold_consecutive_parameters_up_to_the_cap():
    params = [torch.zeros(n) for n in (10, 10, 30, 5, 100)]  # 4 bytes per entry
    assert _buckets(params, cap=80) == [[0, 1], [2], [3], [4]]  # 400 B alone in its own
    assert _buckets(params, cap=10**6) == [[0, 1, 2, 3, 4]]
    assert _buckets([], cap=80) == []


def test_a_flat_bucket_reads_like_ddps_grad_bucket():
    a, b = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(4))
    flat = torch.arange(10.0)
    bucket = FlatBucket(flat, [a, b], index=3, last=True)
    ga, gb = bucket.gradients()
    assert ga.shape == (2, 3) and torch.equal(gb, torch.arange(6.0, 10.0))
    assert ga.data_ptr() == flat.data_ptr()  # views of the buffer, as DDP's bucket views
    assert (bucket.index(), bucket.is_last(), bucket.parameters()) == (3, True, [a, b])


def test_accelerate_with_one_process_is_refused_in_one_line():
    accelerate = pytest.importorskip("accelerate")
    from dtrain.integrations.accelerate import register_dgc

    accelerator = accelerate.Accelerator(cpu=True)
    model = accelerator.prepare(nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="this Accelerator has one process: launch with"):
        register_dgc(accelerator, model, opt)
