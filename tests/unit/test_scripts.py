"""The benchmark scripts of scripts/: the GPU plan's bookkeeping, and both scripts run on a CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import gpu_bench  # noqa: E402


def script_env() -> dict:
    """The package from src/ first, as scripts/gpu_bench.sh runs it."""
    src = str(SCRIPTS.parent / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def graph_step(name: str, tempme_speed: float, form: str) -> "gpu_bench.Step":
    row = {"method": "tempme", "size_attention": form, "videos_per_s": tempme_speed}
    return gpu_bench.Step(name, 1, ["--cuda-graph"], status="ok", report={"results": [row]})


def test_size_attention_forms_rank_by_the_same_batch_graph_steps():
    run = gpu_bench.Run(steps=[graph_step("big-inference-graph", 1094, "bias")])
    assert gpu_bench.ranked_size_attention(run, None) == ["bias", "channels", "flex", "values"]  # only bias measured
    run.steps.append(graph_step("big-inference-graph-channels", 1148, "channels"))
    assert gpu_bench.ranked_size_attention(run, None) == ["channels", "bias", "flex", "values"]
    run.steps.append(graph_step("big-inference-graph-flex", 1120, "flex"))
    assert gpu_bench.ranked_size_attention(run, None) == ["channels", "flex", "bias", "values"]
    run.steps.append(graph_step("big-inference-graph-values", 1200, "values"))
    assert gpu_bench.ranked_size_attention(run, None) == ["values", "channels", "flex", "bias"]
    run.steps.append(graph_step("big-inference-graph-batch128", 5000, "bias"))  # another batch: ignored
    assert gpu_bench.ranked_size_attention(run, None)[0] == "values"
    assert gpu_bench.ranked_size_attention(run, "bias") == ["bias", "values", "channels", "flex"]  # given on the command line


def test_placeholders_become_the_fastest_and_the_second_form():
    run = gpu_bench.Run(steps=[graph_step("big-inference-graph", 900, "bias"),
                               graph_step("big-inference-graph-channels", 1000, "channels"),
                               graph_step("big-inference-graph-flex", 950, "flex")])
    step = gpu_bench.Step("x", 1, ["--size-attention", gpu_bench.BEST, "--then", gpu_bench.OTHER])
    gpu_bench.resolve_placeholders(step, run, None)
    assert step.args == ["--size-attention", "channels", "--then", "flex"]


def test_the_plan_names_each_step_once_and_orders_the_cheap_steps_first():
    args = gpu_bench.argparse.Namespace(frames=12, device="cuda", dtype="bf16", repeats=20, warmup=5,
                                        big="ViT-B/16", small="ViT-B/32", batch=32, train_batch=32)
    names = [step.name for step in gpu_bench.plan(args)]
    assert len(names) == len(set(names))
    # The fused merge kernels, untimed on a GPU, first, beside the tensor operations in the same form.
    assert names[:3] == ["big-inference-graph-channels", "big-inference-graph-triton", "big-merge-variants"]
    triton_steps = [step for step in gpu_bench.plan(args) if "triton" in step.name]
    assert len(triton_steps) == 5 and all(step.args[-2:] == ["--merge-kernels", "triton"] for step in triton_steps)
    assert names.index("big-training") < names.index("big-inference-compiled") < names.index("big-profile-tempme")
    compiled = next(step for step in gpu_bench.plan(args) if step.name == "big-inference-compiled")
    assert gpu_bench.BEST in compiled.args


def test_a_step_runs_tempme_bench_and_keeps_its_report(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", script_env()["PYTHONPATH"])
    step = gpu_bench.Step("tiny", 120, ["--model", "tiny-B/32", "--batch", "1", "--device", "cpu", "--methods",
                                        "none", "--repeats", "1", "--warmup", "0", "--json"])
    gpu_bench.run_step(step, time_left=120)
    assert step.status == "ok", step.error
    assert [row["method"] for row in step.report["results"]] == ["none"]
    skipped = gpu_bench.Step("late", 120, [])
    gpu_bench.run_step(skipped, time_left=5)  # under 20 s left: not started
    assert skipped.status == "skipped"


@pytest.mark.parametrize("method", ["tempme", "merge-free"])
def test_profile_script_prints_operators_and_the_encoder_parts(method):
    out = run_profile_script("--method", method)
    assert out.startswith(f"{method} tiny-B/32, size attention bias")
    parts = out.split("CPU time per call, by part of the encoder:")[1]
    assert "attention" in parts and "mlp" in parts
    assert ("matching" in parts and "apply merge" in parts) == (method == "tempme")
    assert "backward functions" not in out


def test_profile_script_profiles_training_steps_with_their_backward_functions():
    out = run_profile_script("--train")
    assert out.startswith("tempme training tiny-B/32, size attention bias")
    parts, backward = out.split("CPU time per call, by part of the encoder:")[1].split("backward functions")
    assert "matching" in parts and "apply merge" in parts
    assert "WeightedMergeBackward" in backward


def run_profile_script(*extra: str) -> str:
    command = [sys.executable, str(SCRIPTS / "profile_encoder.py"), "--model", "tiny-B/32", "--batch", "1",
               "--device", "cpu", "--dtype", "fp32", "--calls", "1", "--rows", "30", *extra]
    return subprocess.run(command, capture_output=True, text=True, env=script_env(), timeout=300, check=True).stdout


def test_merge_variants_compute_the_same_merges():
    import bench_merging

    from tempme.bench import prepare_encoder

    encoder = prepare_encoder("tiny-B/16", "tempme", 12, torch.device("cpu"), torch.float32, False, "bias")
    merges = bench_merging.record_merges(encoder, torch.randn(2, 12, 3, 224, 224))
    # tiny-B/16 at 12 frames: ImgMe merges, then ClipMe's cross-clip and intra-clip merges
    assert len(merges) == 15 and merges[0].tokens == (24, 197, 64) and not merges[0].sized
    assert any(m.num_cls > 1 for m in merges)  # joined clips carry several CLS tokens
    outputs = {}
    # The fused kernels, interpreted here, take minutes at these shapes: tests/unit/test_fused_merging.py
    # checks them on small ones.
    for name, variant in bench_merging.VARIANTS.items():
        if variant.needs_gpu:
            continue
        inputs = bench_merging.make_inputs(merges, torch.device("cpu"), torch.float32)
        with torch.inference_mode():
            outputs[name] = bench_merging.sequences(merges, inputs, variant)["both"]()
    for name, results in outputs.items():
        for (x, size), (x_ref, size_ref) in zip(results, outputs["library"]):
            torch.testing.assert_close(x, x_ref, msg=name)
            torch.testing.assert_close(size, size_ref, msg=name)


def test_merge_benchmark_script_prints_every_variant():
    command = [sys.executable, str(SCRIPTS / "bench_merging.py"), "--model", "tiny-B/32", "--batch", "1",
               "--device", "cpu", "--dtype", "fp32", "--repeats", "1"]
    out = subprocess.run(command, capture_output=True, text=True, env=script_env(), timeout=300, check=True).stdout
    assert out.startswith("15 merges of tempme tiny-B/32")
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["library", "rescale-b", "float32-scores"]


def result_row(method, videos_per_s, speedup=None, mode="inference", memory=None, execution="graph", form="bias",
               cosine=None):
    from tempme.bench import Result

    return Result(mode=mode, model="ViT-B/16", method=method, frames=12, batch=32, device="cuda",
                  device_name="NVIDIA H100 80GB HBM3", threads=1, dtype="bf16", compiled=execution == "compiled",
                  size_attention=form, first_call_s=1.0, times_s=[0.03], median_s=32 / videos_per_s,
                  videos_per_s=videos_per_s, step_memory_mb=None, weights_mb=1.0, speedup_vs_none=speedup,
                  memory_vs_none=memory, cuda_graph=execution == "graph", cosine_vs_eager=cosine).to_dict()


def test_targets_summary_reports_each_target_from_one_step():
    def step(name, *rows):
        return gpu_bench.Step(name, 1, [], status="ok", report={"results": list(rows)})

    run = gpu_bench.Run(steps=[
        step("big-inference-graph", result_row("none", 980, 1.0, cosine=1.0), result_row("tempme", 1150, 1.17, cosine=0.999),
             result_row("plain-vit", 910, 0.93, cosine=1.0)),
        step("big-inference-graph-flex", result_row("none", 975, 1.0), result_row("tempme", 1310, 1.34, form="flex")),
        step("big-inference-compiled", result_row("none", 1000, 1.0, execution="compiled", cosine=0.9999),
             result_row("tempme", 1480, 1.48, execution="compiled", form="flex", cosine=0.995)),
        step("big-training", result_row("none", 200, 1.0, mode="training", memory=1.0),
             result_row("tempme", 300, 1.52, mode="training", memory=0.56)),
        step("small-inference-graph", result_row("tempme", 9000, 3.0) | {"model": "ViT-B/32"}),  # another model
        step("big-inference-graph-bias-efficient",  # none forced onto a slower kernel: not a fair ratio
             result_row("none", 850, 1.0) | {"attention_backend": "efficient"},
             result_row("tempme", 1500, 1.76) | {"attention_backend": "efficient"}),
    ])
    summary = gpu_bench.targets_summary(run, "ViT-B/16").splitlines()
    assert summary[1] == ("  tempme >= 1.45x none: MET, best 1.48x "
                          "(big-inference-compiled: compiled, size attention flex, batch 32)")
    assert summary[2].startswith("  tempme >= 1300 videos/s (on an H100): MET, best 1480 (big-inference-compiled")
    assert summary[3].startswith("  none >= a plain fused-attention ViT: MET, none vs plain-vit 1.08x")
    assert summary[4].startswith("  training: tempme >= 1.5x none in <= 0.75x its memory: MET, 1.52x in 0.56x")
    assert summary[5] == ("  compiled and graph embeddings = eager ones (cosine >= 0.99): MET, smallest 0.99500 "
                          "(tempme, ViT-B/16, big-inference-compiled: compiled, size attention flex, batch 32)")
    assert len(summary) == 6
    run.steps = run.steps[:2]
    run.steps[0].report["results"][1]["cosine_vs_eager"] = 0.97  # a merge decided otherwise: too far
    summary = gpu_bench.targets_summary(run, "ViT-B/16").splitlines()
    assert summary[1] == ("  tempme >= 1.45x none: not met, best 1.34x "
                          "(big-inference-graph-flex: graph, size attention flex, batch 32)")
    assert "MET, best 1310" in summary[2]
    assert "(cosine >= 0.99): not met, smallest 0.97000 (tempme" in summary[4]
    assert gpu_bench.targets_summary(gpu_bench.Run(), "ViT-B/16").endswith("nothing measured")
