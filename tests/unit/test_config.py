"""Config: TOML + overrides, type checks, unknown keys, validation, round trip."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from dtrain.config import JobConfig, from_dict, load_config, to_dict, to_toml
from dtrain.errors import UserError

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(str(path))
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg


def test_overrides_are_typed_and_win_over_the_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[optim]\nlr = 0.5\nmilestones = [0.3]\n[comm]\nhook = "fp16"\n')
    cfg = load_config(
        str(f),
        [
            "--optim.lr=0.05",
            "--run.max_steps",
            "7",
            "--optim.nesterov=true",
            "--optim.milestones=0.2,0.6",
            "--data.synthetic_shape=1,8,8",
        ],
    )
    assert cfg.optim.lr == 0.05 and cfg.run.max_steps == 7 and cfg.optim.nesterov is True
    assert cfg.optim.milestones == (0.2, 0.6) and cfg.data.synthetic_shape == (1, 8, 8)
    assert cfg.comm.hook == "fp16"  # from the file
    assert cfg.run.name == "digits_cnn-digits-fp16"  # derived when empty


@pytest.mark.parametrize(
    "args,message",
    [
        (["--optim.lrr=1"], "unknown key optim.lrr (did you mean 'optim.lr'?)"),
        (["--optm.lr=1"], "did you mean 'optim.lr'"),
        (["--optim.lr=fast"], "optim.lr must be float, got 'fast'"),
        (["--run.max_steps=1.5"], "run.max_steps must be int"),
        (["--comm.exact_topk=maybe"], "comm.exact_topk must be bool"),
        (["--comm.hook=topk"], "comm.hook must be one of dgc, allreduce, fp16, powersgd"),
        (["--comm.density=0"], "comm.density must be in (0, 1]"),
        (["--comm.mode=ef"], "comm.mode must be one of lr_weighted, paper"),
        (["--comm.momentum_masking=maybe"], "comm.momentum_masking must be one of auto, true"),
        (["--comm.mode=paper", "--comm.flush=true"], "comm.flush = true needs comm.mode"),
        (["--comm.selection=layer"], "comm.selection must be one of tensor, bucket"),
        (["--comm.selection=bucket", "--comm.momentum_masking=true"], "needs comm.selection"),
        (["--comm.selection=bucket", "--comm.mode=paper"], "needs comm.selection"),
        (["--optim.name=adamw", "--comm.flush=true"], "comm.flush = true needs optim.name"),
        (["--comm.density_schedule=cosine"], "comm.density_schedule must be one of auto"),
        (["--comm.mode=paper", "--comm.density_schedule=lr"], "'lr' needs comm.mode"),
        (["--optim.name=adamw", "--comm.density_schedule=lr"], "'lr' needs optim.name"),
        (["--comm.mode=paper", "--comm.density_schedule=budget"], "'budget' needs comm.mode"),
        (["--optim.momentum=1"], "optim.momentum must be in [0, 1)"),
        (["--data.name=cifar10"], "data.path is required"),
        (["--run.name=a/b"], "run.name must be a plain directory name"),
        (["--comm.warmup_epochs=1", "--comm.warmup_steps=5"], "both set"),
        (["--optim.clip_grad_norm=1"], "use comm.clip_norm"),
        (["lr=1"], "overrides look like --section.key=value"),
        (["--optim.lr"], "--optim.lr needs a value"),
    ],
)
def test_bad_overrides_name_the_problem(args, message):
    with pytest.raises(UserError) as e:
        load_config(None, args)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "text,message",
    [
        ("[optim\nlr = 1", "is not valid TOML"),
        ("[optimizer]\nlr = 1", "unknown section [optimizer] (did you mean 'optim'?)"),
        ("[optim]\nlr = 'high'", "optim.lr must be float"),
        ("[run]\nmax_steps = true", "run.max_steps must be int"),
        ("[comm]\nbucket = 1", "unknown key comm.bucket (did you mean 'comm.bucket_cap_mb'?)"),
        ("optim = 3", "[optim] must be a table"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        load_config(str(f))
    assert message in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "nope.toml"))
    with pytest.raises(UserError, match="is a directory"):
        load_config(str(tmp_path))


def test_to_dict_holds_plain_values_only():
    d = to_dict(JobConfig())

    def plain(v):
        return isinstance(v, (bool, int, float, str)) or (
            isinstance(v, list) and all(plain(x) for x in v)
        )

    assert all(plain(v) for sec in d.values() for v in sec.values())
    assert set(d) == {f.name for f in dataclasses.fields(JobConfig)}


def test_seed_out_of_range_is_one_line():
    from dtrain.errors import UserError

    with pytest.raises(UserError, match=r"run.seed must be in \[0, 2\*\*32\)"):
        load_config(None, ["--run.seed=18446744073709551616"])


def test_momentum_masking_reads_toml_booleans_of_older_run_configs(tmp_path):
    """Run directories written before the modes hold ``momentum_masking = true``."""
    f = tmp_path / "c.toml"
    f.write_text("[comm]\nmomentum_masking = true\n")
    assert load_config(str(f)).comm.momentum_masking == "true"
    f.write_text("[comm]\nmomentum_masking = false\n")
    assert load_config(str(f)).comm.momentum_masking == "false"
    assert load_config(None).comm.momentum_masking == "auto"


def test_config_modes_are_the_hooks():
    from dtrain.comm.dgc_state import MODES
    from dtrain.config import DGC_MODES

    assert sorted(DGC_MODES) == sorted(MODES)
