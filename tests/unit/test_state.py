"""DGCState's validation, pickling and name handling, without processes."""

import pickle

import pytest
import torch

from dtrain.comm import DGCState, make_hook

BAD = [
    ("density", 0.0, r"density must be in \(0, 1\]"),
    ("density", 1.5, r"density must be in \(0, 1\]"),
    ("momentum", 1.0, r"momentum must be in \[0, 1\)"),
    ("momentum", -0.1, r"momentum must be in \[0, 1\)"),
    ("sample_ratio", 0.0, r"sample_ratio must be in \(0, 1\]"),
    ("clip_norm", 0.0, r"clip_norm must be in > 0 or None"),
    ("start_iter", -1, r"start_iter must be an integer >= 0"),
    ("start_iter", 1.5, r"start_iter must be an integer >= 0"),
    ("warmup_steps", -3, r"warmup_steps must be an integer >= 0"),
    ("warmup_stages", 0, r"warmup_stages must be an integer >= 1"),
    ("min_compress_numel", 0, r"min_compress_numel must be an integer >= 1"),
    ("value_dtype", torch.int8, r"value_dtype must be one of"),
    ("lr_density_gain", 0.0, r"lr_density_gain must be in > 0"),
]


@pytest.mark.parametrize("name,value,message", BAD)
def test_out_of_range_arguments_name_argument_and_range(name, value, message):
    with pytest.raises(ValueError, match=message):
        DGCState(**{name: value})


def test_lr_density_needs_lr_weighted_mode():
    with pytest.raises(ValueError, match="lr_density_gain needs mode='lr_weighted'"):
        DGCState(mode="paper", lr_density_gain=2.0)


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="nesterov=True needs momentum"):
        DGCState(momentum=0.0, nesterov=True)


def test_valid_arguments_are_kept():
    s = DGCState(
        density=0.01,
        momentum=0.5,
        nesterov=True,
        clip_norm=2.0,
        start_iter=3,
        warmup_steps=10,
        value_dtype=torch.bfloat16,
    )
    assert (s.density, s.momentum, s.nesterov, s.clip_norm, s.start_iter, s.warmup_steps) == (
        0.01,
        0.5,
        True,
        2.0,
        3,
        10,
    )
    assert s.density_at(0) == 1.0 and s.density_at(3) == 0.25 and s.density_at(13) == 0.01


def test_pickle_drops_process_group_and_keeps_config():
    s = DGCState(process_group=object(), density=0.02)
    s.grad_scaler = object()
    t = pickle.loads(pickle.dumps(s))
    assert t.process_group is None and t.grad_scaler is None and t.density == 0.02


def test_state_dict_is_weights_only_loadable(tmp_path):
    s = DGCState()
    p = torch.nn.Parameter(torch.randn(4, 4))
    s.attach([("layer.weight", p)])
    st = s._param_state(p)
    st.ensure(torch.zeros(16), momentum=True, residual=True)
    st.v += 1.0
    torch.save(s.state_dict(), tmp_path / "dgc.pt")
    loaded = torch.load(tmp_path / "dgc.pt", weights_only=True)
    assert torch.equal(loaded["params"]["layer.weight"]["v"], torch.ones(16))
    fresh = DGCState()
    q = torch.nn.Parameter(torch.randn(4, 4))  # a rebuilt model: new tensors, same names
    fresh.attach([("layer.weight", q)])
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh._params[q].v, torch.ones(16))


def test_state_dict_needs_names():
    s = DGCState()
    s._param_state(torch.nn.Parameter(torch.randn(3, 3)))
    with pytest.raises(RuntimeError, match="attach"):
        s.state_dict()


def test_make_hook_rejects_unknown_names_and_arguments():
    with pytest.raises(ValueError, match="unknown hook 'topk'; choose one of allreduce"):
        make_hook("topk")
    with pytest.raises(ValueError, match="hook 'fp16' does not take density"):
        make_hook("fp16", density=0.1)
    with pytest.raises(ValueError, match="density must be in"):
        make_hook("dgc", density=2.0)


def test_powersgd_restarts_its_memories_after_allreduce_steps_on_resume():
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    from dtrain.comm.counting import counted

    def fresh(start):
        inner = powerSGD_hook.PowerSGDState(None, start_powerSGD_iter=start)
        return counted("powersgd", inner, powerSGD_hook.powerSGD_hook)[0]

    saved = fresh(10)
    saved.iter, saved.inner.iter = 20, 20
    resumed = fresh(10)
    resumed.load_state_dict(saved.state_dict())
    # Compressing on a rebuilt DDP model's first step would pair memories with the wrong
    # buckets: two allreduce steps first, as at a fresh start.
    assert (resumed.iter, resumed.inner.iter, resumed.inner.start_powerSGD_iter) == (20, 20, 22)
    early = fresh(10)
    saved.inner.iter = 5  # saved before compression started: the schedule stays
    early.load_state_dict(saved.state_dict())
    assert (early.inner.iter, early.inner.start_powerSGD_iter) == (5, 10)


def test_powersgd_error_feedback_restarts_when_the_weights_are_rewound():
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    from dtrain.comm.counting import counted

    inner = powerSGD_hook.PowerSGDState(None, start_powerSGD_iter=2)
    state = counted("powersgd", inner, powerSGD_hook.powerSGD_hook)[0]
    inner.error_dict[0] = torch.ones(8)
    state.iter = 7
    state.reset()  # what the pruning job calls at a rewind
    assert inner.error_dict == {} and state.iter == 7
