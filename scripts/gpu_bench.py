"""Run every GPU benchmark of docs/benchmarks.md in one go, inside a fixed time budget.

Each step is one ``tempme bench --json`` process with its own time limit, so a hang or a slow
compilation costs that step only. Steps run most-wanted first; ``bench.json`` is rewritten after every
step, so whatever finished is kept even if the whole run is cut short. Needs src/ on PYTHONPATH
(scripts/gpu_bench.sh sets it) or the package installed.

    python3 scripts/gpu_bench.py --out $OUT                  # the H100 run (scripts/gpu_bench.sh)
    python3 scripts/gpu_bench.py --out /tmp/b --device cpu --big tiny-B/16 --small tiny-B/32 \\
        --batch 1 --dtype fp32 --repeats 1 --warmup 0       # a quick rehearsal on a CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tempme.bench import TIMM_MODELS, Result, format_results, timm_available


@dataclass
class Step:
    name: str
    limit_s: int
    args: list[str]
    status: str = "not run"  # ok, failed, timeout, skipped (no time left)
    seconds: float = 0.0
    report: dict | None = None
    error: str = ""


@dataclass
class Run:
    started: float = field(default_factory=time.time)
    steps: list[Step] = field(default_factory=list)


def plan(args: argparse.Namespace) -> list[Step]:
    """The steps, most wanted first. Compiled runs go one method per process: a compilation that runs
    out of time then loses one method, not all of them."""
    common = ["--frames", str(args.frames), "--device", args.device, "--dtype", args.dtype,
              "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--json"]

    def bench(model: str, batch: int, *extra: str) -> list[str]:
        return ["--model", model, "--batch", str(batch), *common, *extra]

    steps = [
        Step("big-inference-eager", 120, bench(args.big, args.batch, "--baseline")),
        Step("big-training", 120, bench(args.big, args.train_batch, "--train")),
        Step("small-inference-eager", 90, bench(args.small, args.batch, "--baseline")),
    ]
    compiled = ["none", "tempme", "tome", "plain-vit"]
    if args.big in TIMM_MODELS and timm_available():
        compiled.append("timm-vit")
    for method in compiled:
        arguments = bench(args.big, args.batch, "--compile", "--methods", method)
        steps.append(Step(f"big-inference-compiled-{method}", 150, arguments))
    return steps


def run_step(step: Step, time_left: float) -> None:
    """Run one ``tempme bench`` process, limited to its own limit or the time left, whichever is less."""
    limit = min(step.limit_s, time_left)
    if limit < 20:
        step.status = "skipped"
        return
    command = [sys.executable, "-m", "tempme_cli.main", "bench", *step.args]
    print(f"== {step.name}: tempme bench {' '.join(step.args)} (limit {limit:.0f} s)", flush=True)
    start = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        step.status = "timeout"
    else:
        step.status = "ok" if done.returncode == 0 else "failed"
        if done.returncode == 0:
            step.report = json.loads(done.stdout)
        else:
            step.error = done.stderr[-2000:]
    step.seconds = time.time() - start


def step_summary(step: Step) -> str:
    if step.report is None:
        error = f"\n{step.error.strip()}" if step.error else ""
        return f"   {step.name}: {step.status} after {step.seconds:.0f} s{error}"
    return format_results([Result(**row) for row in step.report["results"]])


def compiled_summary(run: Run) -> str:
    """The compiled methods, each timed in its own process, side by side against compiled ``none``."""
    compiled = [step.report for step in run.steps if step.report and "--compile" in step.args]
    results = [Result(**row) for report in compiled for row in report["results"]]
    none = next((r for r in results if r.method == "none"), None)
    for result in results:
        if none is not None:
            result.speedup_vs_none = result.videos_per_s / none.videos_per_s
            if result.step_memory_mb and none.step_memory_mb:
                result.memory_vs_none = result.step_memory_mb / none.step_memory_mb
    if not results:
        return ""
    return (
        "compiled, one process per method ('vs none' here: videos/s over compiled none's):\n"
        + format_results(results)
    )


def save(run: Run, out: Path) -> None:
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(run.started)),
              "steps": [asdict(step) for step in run.steps]}
    (out / "bench.json").write_text(json.dumps(record, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for bench.json")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all steps together")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--big", default="ViT-B/16", help="model of the main, compiled and training runs")
    parser.add_argument("--small", default="ViT-B/32", help="model of the second inference run")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(steps=plan(args))
    for step in run.steps:
        run_step(step, args.budget - (time.time() - run.started))
        print(step_summary(step), flush=True)
        save(run, args.out)
    print(compiled_summary(run), flush=True)
    return 0 if all(step.status == "ok" for step in run.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
