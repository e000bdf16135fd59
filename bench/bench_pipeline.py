"""The compression pipeline with the real jobs: the whole pipeline and each stage alone.

Command (defaults shown)::

    .venv/bin/python bench/bench_pipeline.py --models digits,resnet20 --nproc 2 \\
        [--out runs/bench_pipeline] [--json out.json] [--plots docs/img] [--reuse-sources]

Per model, a source run (``digits``: ``configs/digits.toml``, the digits CNN, 30 epochs, DGC;
``resnet20``: ``configs/resnet20_digits32.toml``, ResNet-20 on the digits at 32x32, 30 epochs,
DGC), then ``dtrain.pipeline`` with ``configs/pipeline/<model>.toml``: all of its stages, and
each of its stages alone followed by the export (so that every variant ends in a file
onnxruntime runs; ``export`` alone is the starting model exported), and for ResNet-20 the
pipeline and the starting model with onnxruntime's static int8 (``EXTRA``). Prints a table per
model (the final artifact of every variant against the starting model: size on disk, batch-64
CPU latency, held-out accuracy) and the whole pipeline's per-stage table; ``--plots`` copies
each whole pipeline's ``accuracy_vs_size.png`` to ``DIR/pipeline_<model>.png``.
"""

import argparse
import json
import shutil
from pathlib import Path

from common import machine_line, md_table, run_job, write_json

MODELS = {
    "digits": ("configs/digits.toml", "configs/pipeline/digits.toml"),
    "resnet20": ("configs/resnet20_digits32.toml", "configs/pipeline/resnet20.toml"),
}
EXTRA = {  # more variants: name -> (stages, overrides)
    "resnet20": {
        "with int8": (["prune", "quantize", "export"], ["--export.onnx_quantize=static"]),
        "int8 alone": (["quantize", "export"], ["--export.onnx_quantize=static"]),
    },
}


def stages_of(config: str) -> list[str]:
    import tomllib

    with open(config, "rb") as f:
        return list(tomllib.load(f)["pipeline"]["stages"])


def variants(stages: list[str]) -> dict[str, list[str]]:
    out = {"whole pipeline": stages}
    for s in stages:
        if s != "export":
            out[f"{s} alone"] = [s, "export"]
    out["export alone"] = ["export"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits,resnet20")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="runs/bench_pipeline")
    p.add_argument("--json")
    p.add_argument("--plots")
    p.add_argument("--reuse-sources", action="store_true",
                   help="keep source runs a previous benchmark left in --out")  # fmt: skip
    args = p.parse_args()
    out = Path(args.out).resolve()
    results: dict[str, dict] = {}
    for model in args.models.split(","):
        train_cfg, pipe_cfg = MODELS[model]
        src = out / f"src-{model}"
        if not (args.reuse_sources and (src / "metrics.jsonl").is_file()):
            run_job("dtrain.train", args.nproc, ["--config", train_cfg, f"--run.out_dir={out}",
                    f"--run.name={src.name}", "--logging.progress=false"], src)  # fmt: skip
        results[model] = {}
        runs = {k: (v, []) for k, v in variants(stages_of(pipe_cfg)).items()}
        for name, (stages, extra) in {**runs, **EXTRA.get(model, {})}.items():
            tag = f"{model}-{name.replace(' ', '-')}"
            argv = ["--config", pipe_cfg, f"--pipeline.source={src}", f"--pipeline.out_dir={out}",
                    f"--pipeline.name={tag}", f"--pipeline.stages={','.join(stages)}",
                    *extra]  # fmt: skip
            run_job("dtrain.pipeline", args.nproc, argv, out / tag, metrics=False)
            report = json.loads((out / tag / "pipeline_report.json").read_text())
            results[model][name] = {"stages": stages, **report}
            print(f"{model} {name}: {report['final_vs_source']}", flush=True)
        if args.plots:
            Path(args.plots).mkdir(parents=True, exist_ok=True)
            shutil.copy(out / f"{model}-whole-pipeline/accuracy_vs_size.png",
                        Path(args.plots) / f"pipeline_{model}.png")  # fmt: skip
    print(machine_line(0))
    for model, by in results.items():
        rows = []
        for name, r in by.items():
            final, c = r["rows"][-1], r["final_vs_source"]
            rows.append([
                name, " → ".join(r["stages"]), final["stage"], f"{final['bytes'] / 1e3:.1f}",
                f"{c['smaller']:.1f}x", f"{final['latency_b64_ms']:.2f}",
                f"{c['faster_b64']:.2f}x", f"{c['faster_b64_than_best_source']:.2f}x",
                f"{100 * final['accuracy']:.2f}", f"{c['accuracy_change_points']:+.2f}",
            ])  # fmt: skip
        source = by["whole pipeline"]["rows"][0]
        print(f"\n{model}: source {source['bytes'] / 1e3:.1f} kB, "
              f"{source['latency_b64_ms']:.2f} ms at batch 64, "
              f"{100 * source['accuracy']:.2f}%\n")  # fmt: skip
        print(md_table(["variant", "stages", "final file", "kB", "smaller", "b64 ms",
                        "faster", "faster than best source", "accuracy %", "Δ points"],
                       rows))  # fmt: skip
        whole = out / f"{model}-whole-pipeline/pipeline_report.md"
        print(f"\n{model}, the whole pipeline per stage:\n\n{whole.read_text()}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
