"""metrics.jsonl lines, the no-op logger, resume truncation, wandb offline, format_summary."""

import io
import json
import sys
import time

import numpy as np
import pytest
import torch

from dtrain.config import JobConfig, LoggingConfig, to_dict
from dtrain.errors import UserError
from dtrain.metrics import (
    MetricsLogger,
    NullLogger,
    format_summary,
    make_logger,
    wandb_identity,
    wandb_keys,
)

CONFIG = to_dict(JobConfig())


def make(run_dir, *, rank=0, wandb="disabled", start_step=0, resume=False, **kw):
    cfg = LoggingConfig(wandb=wandb, progress=False, **kw)
    return make_logger(
        cfg,
        run_dir,
        rank=rank,
        config=CONFIG,
        total_steps=100,
        start_step=start_step,
        resume=resume,
    )


def lines(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_log_appends_one_flushed_json_line_per_call(tmp_path):
    m = make(tmp_path)
    assert isinstance(m, MetricsLogger)
    m.log(10, {"loss": torch.tensor(2.5), "lr": np.float64(0.1), "bytes_sent": 1200})
    # Flushed: readable before close.
    assert lines(tmp_path) == [
        {"kind": "train", "step": 10, "time": lines(tmp_path)[0]["time"], "loss": 2.5,
         "lr": 0.1, "bytes_sent": 1200}
    ]  # fmt: skip
    m.log(20, {"test_loss": 1.5, "test_accuracy": 0.75, "epoch": 1}, kind="eval")
    m.summary({"test_accuracy": 0.75, "steps": 20})
    m.close()
    m.close()  # idempotent
    got = lines(tmp_path)
    assert [g["kind"] for g in got] == ["train", "eval", "summary"]
    assert got[1]["test_accuracy"] == 0.75 and got[1]["step"] == 20
    assert got[2] == {"kind": "summary", "time": got[2]["time"], "test_accuracy": 0.75, "steps": 20}
    assert 0 <= got[0]["time"] <= got[1]["time"] < 60


def test_other_ranks_get_a_null_logger_that_writes_nothing(tmp_path):
    with make(tmp_path / "run", rank=1, wandb="offline") as m:
        assert isinstance(m, NullLogger) and not isinstance(m, MetricsLogger)
        m.log(1, {"loss": 1.0})
        m.advance(3, loss=1.0)
        m.summary({"a": 1})
    assert not (tmp_path / "run").exists()


def test_fresh_start_replaces_an_old_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 5, "loss": 9}\n')
    with make(tmp_path) as m:
        m.log(1, {"loss": 1.0})
    assert [g["step"] for g in lines(tmp_path)] == [1]


def test_resume_drops_lines_after_the_checkpoint(tmp_path):
    with make(tmp_path) as m:
        for step in (10, 20, 30, 40):
            m.log(step, {"loss": 1.0 / step})
        m.log(20, {"test_loss": 0.5}, kind="eval")
        m.summary({"steps": 40})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a line cut short by the crash
    with make(tmp_path, start_step=20, resume=True) as m:
        m.log(30, {"loss": 0.03})
    got = lines(tmp_path)
    assert [(g["kind"], g["step"]) for g in got] == [
        ("train", 10),
        ("train", 20),
        ("eval", 20),
        ("train", 30),
    ]
    assert got[-1]["loss"] == 0.03
    assert got[-1]["time"] >= got[-2]["time"]  # the clock continues from the old run


def test_advance_without_tty_is_silent(tmp_path, capsys):
    cfg = LoggingConfig(progress=True)
    with make_logger(cfg, tmp_path, rank=0, config=CONFIG, total_steps=10) as m:
        assert not sys.stderr.isatty()
        m.advance(2, loss=0.5)
    assert capsys.readouterr().err == ""


def test_missing_wandb_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(UserError, match=r"logging\.wandb = 'offline' needs wandb: pip install"):
        make(tmp_path, wandb="offline")


def test_wandb_offline_writes_a_run_under_the_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    start = time.monotonic()
    with make(tmp_path, wandb="offline", wandb_project="dtrain-test") as m:
        m.log(1, {"loss": 2.0})
        m.log(1, {"test_loss": 1.0}, kind="eval")
        m.summary({"test_loss": 1.0})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    run_id = (tmp_path / "wandb_id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    assert list(runs[0].glob("*.wandb")) and [g["kind"] for g in lines(tmp_path)] == [
        "train",
        "eval",
        "summary",
    ]
    assert time.monotonic() - start < 60


def test_format_summary():
    text = format_summary(
        {
            "steps": 300,
            "wall_seconds": 83.0,
            "test_loss": 0.0912,
            "test_accuracy": 97.123,
            "bytes_sent_total": 1.2e6,
            "dense_bytes_total": 4.5e8,
            "ratio_total": 375.0,
        }
    )
    assert text == (
        "final test accuracy 97.12% | compression ratio 375x | sent 1.2 MB vs 450 MB dense | "
        "300 steps in 1m 23s"
    )
    assert format_summary({"bytes_sent_total": 10, "ratio_total": 2.5}) == (
        "compression ratio 2.5x | sent 10 B"
    )
    lm = format_summary({"test_perplexity": 3.21, "wall_seconds": 5.25, "bytes_sent_total": 512})
    assert lm == "final test perplexity 3.210 | sent 512 B | in 5.2 s"
    assert format_summary({"bytes_sent_total": 1e3, "dense_bytes_total": 4e9}) == (
        "compression ratio 4,000,000x | sent 1 kB vs 4 GB dense"
    )
    assert format_summary({}) == "done"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_tty_starts_at_start_step(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    cfg = LoggingConfig(progress=True)
    m = make_logger(cfg, tmp_path, rank=0, config=CONFIG, total_steps=10, start_step=4)
    m.advance(2, loss=0.25)
    m.log(6, {"test_loss": 0.5}, kind="eval")  # written above the bar
    m.close()
    out = sys.stderr.getvalue()
    assert "6/10" in out and "loss=0.25" in out and "eval step 6: test_loss 0.5" in out


def test_a_resumed_run_logs_earlier_steps_to_wandb_again(tmp_path, monkeypatch):
    """wandb drops a log() whose step is below its current one; a resumed run repeats the steps
    logged after the last checkpoint, so the optimizer step travels as a metric instead."""
    wandb = pytest.importorskip("wandb")
    calls = []

    class FakeRun:
        def __init__(self):
            self.summary = {}

        def define_metric(self, name, **kw):
            calls.append(("define", name, kw))

        def log(self, data, step=None):
            calls.append(("log", data, step))

        def finish(self, exit_code=0):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun())
    with make(tmp_path, wandb="offline") as m:
        m.log(30, {"loss": 1.0})
    with make(tmp_path, wandb="offline", start_step=20, resume=True) as m:
        m.log(21, {"loss": 0.9})
    assert ("define", "*", {"step_metric": "trainer/step"}) in calls
    logs = [c for c in calls if c[0] == "log"]
    assert [(d["trainer/step"], d["train/loss"], step) for _, d, step in logs] == [
        (30, 1.0, None),
        (21, 0.9, None),  # no step=: wandb keeps it
    ]


def test_wandb_groups_the_communication_counters_under_comm():
    keys = wandb_keys("train", {"loss": 0.5, "ratio": 900.0, "bytes_sent_total": 1e6})
    assert keys == {"train/loss": 0.5, "comm/ratio": 900.0, "comm/bytes_sent_total": 1e6}
    assert wandb_keys("prune", {"sparsity": 0.9}) == {"prune/sparsity": 0.9}
    assert wandb_keys("eval", {"ratio": 1.0}) == {"eval/ratio": 1.0}  # only a train line's


def test_wandb_identity_takes_the_config_then_the_environment(tmp_path, monkeypatch):
    for k in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_NAME"):
        monkeypatch.delenv(k, raising=False)
    run_dir = tmp_path / "resnet20-dgc"
    assert wandb_identity(LoggingConfig(), run_dir) == {
        "project": "dtrain", "entity": None, "group": None, "name": "resnet20-dgc",
    }  # fmt: skip
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_ENTITY", "env-team")
    monkeypatch.setenv("WANDB_RUN_GROUP", "env-group")
    monkeypatch.setenv("WANDB_NAME", "env-name")
    assert wandb_identity(LoggingConfig(), run_dir) == {
        "project": "env-project", "entity": "env-team", "group": "env-group", "name": "env-name",
    }  # fmt: skip
    cfg = LoggingConfig(wandb_project="p", wandb_entity="e", wandb_group="g", wandb_name="n")
    assert wandb_identity(cfg, run_dir) == {
        "project": "p",
        "entity": "e",
        "group": "g",
        "name": "n",
    }
