"""python -m dtrain.report on fake runs: the PNGs it writes and its user errors."""

import json
import re

import pytest

from dtrain.report import load_run, main

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = [
    "loss_vs_step.png",
    "loss_vs_bytes.png",
    "metric_vs_step.png",
    "metric_vs_bytes.png",
    "ratio_vs_step.png",
]


def fake_run(run_dir, *, ratio: float, metric: str = "test_accuracy") -> None:
    run_dir.mkdir(parents=True)
    out = []
    for step in range(10, 210, 10):
        dense = 4e5 * step
        out.append(
            {
                "kind": "train",
                "step": step,
                "time": step * 0.1,
                "loss": 2.0 / (1 + step / 50),
                "bytes_sent_total": dense / ratio,
                "dense_bytes_total": dense,
                "ratio_total": ratio,
            }
        )
        if step % 50 == 0:
            out.append({"kind": "eval", "step": step, "test_loss": 1.0, metric: step / 250})
    out.append({"kind": "summary", "steps": 200})
    text = "".join(json.dumps(e) + "\n" for e in out)
    (run_dir / "metrics.jsonl").write_text(text + '{"kind": "tra')  # plus a cut-short line


def test_two_runs_make_five_valid_pngs(tmp_path, capsys):
    fake_run(tmp_path / "dgc", ratio=300.0)
    fake_run(tmp_path / "allreduce", ratio=1.0)
    out = tmp_path / "figs"
    assert main([str(tmp_path / "dgc"), str(tmp_path / "allreduce"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / name) for name in PLOTS]
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name


def test_default_out_is_the_first_runs_plots_dir(tmp_path):
    fake_run(tmp_path / "lm", ratio=50.0, metric="test_perplexity")
    assert main([str(tmp_path / "lm")]) == 0
    assert sorted(p.name for p in (tmp_path / "lm" / "plots").iterdir()) == sorted(PLOTS)


def test_bytes_at_eval_steps_are_interpolated(tmp_path):
    fake_run(tmp_path / "r", ratio=4.0)
    run = load_run(tmp_path / "r")
    steps, _ = run.series("test_accuracy", kind="eval")
    assert steps.tolist() == [50, 100, 150, 200]
    assert run.bytes_at(steps).tolist() == [4e5 * s / 4 for s in (50, 100, 150, 200)]


def test_runs_without_eval_lines_skip_the_metric_plots(tmp_path, capsys):
    d = tmp_path / "r"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    assert main([str(d)]) == 0
    assert sorted(p.name for p in (d / "plots").iterdir()) == ["loss_vs_step.png"]
    assert "skipped metric_vs_step.png" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setup,message",
    [
        ("missing", "run directory .* not found"),
        ("no_file", "has no metrics.jsonl"),
        ("empty", "has no train or eval lines"),
        ("unplottable", "nothing to plot"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, setup, message):
    d = tmp_path / "r"
    if setup != "missing":
        d.mkdir()
    if setup == "empty":
        (d / "metrics.jsonl").write_text('{"kind": "summary"}\nnot json\n')
    if setup == "unplottable":
        (d / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "lr": 0.1}\n')
    assert main([str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.search(message, err)
    assert not (d / "plots").exists()


def test_out_that_is_a_file_exits_2_with_one_line(tmp_path, capsys):
    fake_run(tmp_path / "a", ratio=100.0)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main([str(tmp_path / "a"), "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write plots to" in err, err
