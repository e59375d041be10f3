"""Benchmark harness tests: every method runs and reports, the training step really trains, errors are
clear. Tiny models, one timed call, no assertion on how fast anything is."""

import json
import statistics

import pytest
import torch

import tempme.bench
from tempme.bench import (
    TensorMemoryTracker,
    benchmark_inference,
    cosine_to_eager,
    benchmark_training,
    format_results,
    make_training_step,
    report,
    Result,
    Timing,
    add_ratios,
    timing_warnings,
)
from tempme_cli.main import main

TINY = dict(frames=12, batch=1, repeats=1, warmup=0)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")


def test_inference_reports_every_method_with_ratios():
    methods = ("none", "tome", "tempme", "plain-vit")
    results = benchmark_inference("tiny-B/32", methods, **TINY)
    assert [r.method for r in results] == list(methods)
    for result in results:
        assert result.mode == "inference" and result.videos_per_s > 0 and len(result.times_s) == 1
        assert result.step_memory_mb is not None and result.step_memory_mb > 0
        assert result.speedup_vs_none > 0 and result.weights_mb > 0
    assert results[0].speedup_vs_none == 1.0
    table = format_results(results)
    assert all(method in table for method in methods)


def test_optimised_embeddings_are_compared_with_the_eager_encoders():
    torch.manual_seed(0)
    encoder = tempme.bench.build_video_encoder("tiny-B/32", "tempme", frames=4).eval()
    video = torch.randn(2, 4, 3, 224, 224)
    with torch.inference_mode():
        expected = encoder(video)

    class Compiled:  # what torch.compile returns keeps the module as _orig_mod
        _orig_mod = encoder

    assert cosine_to_eager(lambda: expected, Compiled(), video) == pytest.approx(1.0, abs=1e-6)
    # One video's embedding pointing elsewhere is what the smallest cosine must show.
    astray = expected.clone()
    astray[1] = torch.roll(astray[1], 1)
    cosine = torch.nn.functional.cosine_similarity(astray[1], expected[1], dim=0).item()
    assert cosine < 0.9
    assert cosine_to_eager(lambda: astray, encoder, video) == pytest.approx(cosine, abs=1e-6)


def test_the_table_shows_how_far_optimised_embeddings_are_from_eager_ones():
    results = benchmark_inference("tiny-B/32", ("none", "tempme"), **TINY)
    assert all(r.cosine_vs_eager is None for r in results)  # eager runs compare nothing
    assert "smallest cosine" not in format_results(results)
    results[0].cosine_vs_eager, results[1].cosine_vs_eager = 1.0, 0.99871
    assert format_results(results).splitlines()[-1] == (
        "embeddings against the same encoder run eagerly, smallest cosine: none 1.00000, tempme 0.99871"
    )


def test_inference_in_bf16():
    (result,) = benchmark_inference("tiny-B/32", ("tempme",), dtype="bf16", **TINY)
    assert result.dtype == "bf16" and result.videos_per_s > 0


@NO_CUDA
def test_merge_kernels_are_recorded_as_they_ran_and_refused_where_they_cannot():
    (result,) = benchmark_inference("tiny-B/32", ("tempme",), merge_kernels="auto", **TINY)
    assert result.merge_kernels == "torch"  # auto: Triton's kernels on a GPU only
    with pytest.raises(ValueError, match="unknown merge kernels 'fused'"):
        benchmark_training("tiny-B/32", ("tempme",), merge_kernels="fused", **TINY)


def test_training_reports_step_memory():
    results = benchmark_training("tiny-B/32", ("none", "tempme"), **TINY)
    assert [r.method for r in results] == ["none", "tempme"]
    assert all(r.mode == "training" and r.videos_per_s > 0 and r.step_memory_mb > 0 for r in results)


def test_training_step_updates_lora_and_clip_pos_embed_only():
    cpu = torch.device("cpu")
    step = make_training_step("tiny-B/32", "tempme", frames=12, batch=2, device=cpu, dtype=torch.float32)
    before = {name: p.detach().clone() for name, p in step.model.named_parameters()}
    loss = step()
    assert torch.isfinite(loss)
    changed = {name for name, p in step.model.named_parameters() if not torch.equal(p, before[name])}
    assert any("lora_b" in name for name in changed)
    assert any("clip_pos_embed" in name for name in changed)
    assert all("lora_" in name or "clip_pos_embed" in name for name in changed)


def test_tensor_memory_tracker_counts_live_tensors_and_views():
    existing = torch.zeros(1024, 256)  # 1 MiB, made before the tracker: never counted
    mib = 2**20
    with TensorMemoryTracker() as tracker:
        first = existing + 1  # +1 MiB
        view = first.t()
        del first  # still held by its view
        second = existing * 2  # +1 MiB: 2 live
        del view, second
        third = torch.cat([existing, existing])  # +2 MiB after both were freed: 2 live
        del third
        existing.view(-1)  # a view of old memory: not counted
    assert tracker.peak == 2 * mib
    assert tracker.current == 0


def test_report_is_json_serialisable():
    results = benchmark_inference("tiny-B/32", ("none",), **TINY)
    record = json.loads(json.dumps(report(results)))
    assert record["results"][0]["method"] == "none"
    assert record["torch"] == torch.__version__


def fabricated(times: dict[str, list[float]]) -> list[Result]:
    """Results with made-up times (nothing timed), their ratios worked out as a run's are."""
    results = [Result(mode="inference", model="ViT-B/32", method=method, frames=12, batch=1, device="cpu",
                      device_name="cpu", threads=2, dtype="fp32", compiled=False, size_attention="bias",
                      first_call_s=0.0, times_s=rounds, median_s=statistics.median(rounds),
                      videos_per_s=1 / statistics.median(rounds), step_memory_mb=None, weights_mb=1.0)
               for method, rounds in times.items()]
    if "none" in times:  # as measure() does
        add_ratios(results, {method: Timing(0.0, rounds) for method, rounds in times.items()})
    return results


def test_ratios_that_contradict_the_medians_are_warned_about():
    # Two rounds on a loaded machine: the ratio says tempme is faster, the medians that it is slower.
    loaded = fabricated({"none": [0.6, 2.25], "tome": [0.5, 1.9], "tempme": [0.2, 4.1]})
    assert loaded[2].speedup_vs_none > 1 > loaded[0].median_s / loaded[2].median_s
    (warning,) = timing_warnings(loaded)
    assert warning.startswith("the machine's load varied during the run: 'vs none' and the ratio of the median "
                              "times disagree (tempme 1.77x vs 0.66x); time again with more --repeats")
    assert json.loads(json.dumps(report(loaded)))["warnings"] == [warning]
    # Far apart, though both say faster.
    assert timing_warnings(fabricated({"none": [1.0, 1.0, 3.0], "tempme": [0.5, 0.1, 1.0]}))


def test_steady_timings_are_not_warned_about():
    steady = fabricated({"none": [1.0, 1.1, 1.05], "tempme": [0.5, 0.56, 0.52], "tome": [1.2, 1.3, 1.25]})
    assert timing_warnings(steady) == [] and report(steady)["warnings"] == []
    assert timing_warnings(fabricated({"tempme": [1.0, 9.0]})) == []  # no none: no ratios
    # A method as fast as none: 0.99x per round beside 1.01x of the medians is noise, not a contradiction.
    as_fast = fabricated({"none": [1.0, 1.05, 0.98], "plain-vit": [1.01, 0.99, 0.985]})
    assert as_fast[1].speedup_vs_none < 1 < as_fast[0].median_s / as_fast[1].median_s
    assert timing_warnings(as_fast) == []


@pytest.mark.parametrize("json_output", [True, False])
def test_cli_prints_the_timing_warning_on_stderr_and_in_json(json_output, monkeypatch, capsys):
    monkeypatch.setattr(tempme.bench, "timing_warnings", lambda results: ["the load varied"])
    argv = ["bench", "--model", "tiny-B/32", "--batch", "1", "--repeats", "1", "--warmup", "0", "--methods", "none"]
    with pytest.warns(UserWarning, match="the load varied"):
        assert main(argv + ["--json"] * json_output) == 0
    if json_output:
        assert json.loads(capsys.readouterr().out)["warnings"] == ["the load varied"]


def test_cli_json_output(capsys):
    argv = ["bench", "--model", "tiny-B/32", "--batch", "1", "--repeats", "1", "--warmup", "0", "--json"]
    assert main(argv + ["--methods", "none,tempme"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert [r["method"] for r in record["results"]] == ["none", "tempme"]
    assert all(r["videos_per_s"] > 0 for r in record["results"])
    # Inference times the model as optimize_for_inference leaves it ("auto"), which is the bias on a CPU.
    assert {r["size_attention"] for r in record["results"]} == {"bias"}
    assert "timing" not in captured.err  # --json: no progress bar


def test_cli_table_shows_progress_on_stderr(capsys):
    argv = ["bench", "--model", "tiny-B/32", "--batch", "1", "--repeats", "2", "--warmup", "1"]
    assert main(argv + ["--methods", "none,tempme"]) == 0
    captured = capsys.readouterr()
    assert "timing inference" in captured.err and "/10 [" in captured.err
    assert captured.out.startswith("inference: tiny-B/32")


def test_progress_ticks_once_per_call(monkeypatch):
    ticks = []

    class CountingBar:
        def __init__(self, total, **options):
            self.total, self.enabled = total, not options["disable"]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            ticks.append((self.total, self.done, self.enabled))

        done = 0

        def update(self):
            self.done += 1

        def set_postfix_str(self, text, refresh=True):
            pass

    monkeypatch.setattr(tempme.bench, "progress_bar", CountingBar)
    benchmark_inference("tiny-B/32", ("none", "tempme"), frames=12, batch=1, repeats=2, warmup=1, progress=True)
    # 2 methods x (first call + 1 warm-up + 2 timed + 1 memory call)
    assert ticks == [(10, 10, True)]


def test_cli_train_table(capsys):
    argv = ["bench", "--model", "tiny-B/32", "--batch", "2", "--repeats", "1", "--warmup", "0", "--train"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("training: tiny-B/32") and "tempme" in out
    assert "size attention" not in out  # the trainable model's bias, which the table leaves unsaid


@NO_CUDA
def test_cli_cuda_without_cuda_is_a_clear_error(capsys):
    assert main(["bench", "--model", "tiny-B/32", "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_device_names_are_checked_against_this_machine(monkeypatch):
    from tempme.devices import DeviceUnavailable, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", local_rank=3) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceUnavailable, match="unknown device 'gpu'; use auto or cpu or cuda"):
        resolve_device("gpu")
    with pytest.raises(DeviceUnavailable, match="unsupported device 'mps'"):
        resolve_device("mps")  # bench, index and search run on CPUs and CUDA GPUs only
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable, match="MPS .* not available"):
        resolve_device("mps", kinds=("cpu", "mps"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda:1")  # this process's GPU under torchrun
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda:0")
    with pytest.raises(DeviceUnavailable, match=r"2 GPUs \(cuda:0 to cuda:1\); cuda:2 does not exist"):
        resolve_device("cuda:2")
    for name in ("auto", "cuda"):  # torchrun started more processes than there are GPUs
        with pytest.raises(DeviceUnavailable, match="none left for process 2 .*--nproc_per_node"):
            resolve_device(name, local_rank=2)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "none,fast"], "unknown or no method(s) ['fast']"),
        (["--train", "--compile-mode", "reduce-overhead"], "inference only"),
        (["--train", "--baseline"], "inference only"),
        (["--train", "--cuda-graph", "--device", "cpu"], "CUDA graphs need a CUDA device"),
        (["--train", "--cuda-graph", "--compile", "--device", "cpu"], "an uncompiled model"),
        (["--batch", "0"], "need batch >= 1"),
        (["--repeats", "0"], "repeats >= 1"),
        (["--threads", "-2"], "--threads must be at least 1, got -2"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
    ],
)
def test_cli_rejects_bad_options(extra, message, capsys):
    assert main(["bench", "--model", "tiny-B/32", *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_method_list_that_names_none(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["bench", "--model", "tiny-B/32", "--methods", ","])
    assert exit.value.code == 2 and "no method named in ','" in capsys.readouterr().err


def test_timm_baseline_where_timm_imports():
    pytest.importorskip("timm")
    (result,) = benchmark_inference("ViT-B/32", ("timm-vit",), frames=2, batch=1, repeats=1, warmup=0)
    assert result.videos_per_s > 0


def attention_shapes(encoder, frames):
    shapes = []
    hooks = [
        block.attn.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
        for block in encoder.transformer.resblocks
    ]
    with torch.no_grad():
        encoder(frames)
    for hook in hooks:
        hook.remove()
    return shapes


def test_merge_free_encoder_runs_attention_on_tempme_shapes():
    from tempme.bench import build_video_encoder

    frames = torch.randn(2, 12, 3, 224, 224)
    tempme_encoder = build_video_encoder("tiny-B/32", "tempme", 12)
    merge_free = build_video_encoder("tiny-B/32", "merge-free", 12)
    expected = attention_shapes(tempme_encoder, frames)
    assert attention_shapes(merge_free.visual, frames) == expected
    assert expected[0][:2] != expected[-1][:2]  # the schedule did merge
    with torch.no_grad():
        assert merge_free(frames).shape == tempme_encoder(frames).shape


def test_merge_free_training_step_trains_lora_on_tempme_shapes():
    cpu = torch.device("cpu")
    step = make_training_step("tiny-B/32", "merge-free", frames=12, batch=2, device=cpu, dtype=torch.float32)
    reference = make_training_step("tiny-B/32", "tempme", frames=12, batch=2, device=cpu, dtype=torch.float32)
    frames = torch.randn(2, 12, 3, 224, 224)
    assert attention_shapes(step.model.visual, frames) == attention_shapes(reference.model.visual, frames)
    before = {name: p.detach().clone() for name, p in step.model.named_parameters()}
    assert torch.isfinite(step())
    changed = {name for name, p in step.model.named_parameters() if not torch.equal(p, before[name])}
    assert any("visual" in name and "lora_b" in name for name in changed)
    assert all("lora_" in name for name in changed)  # no cross-clip merge: clip embeddings get no gradient


def test_size_attention_choice_is_recorded_and_checked():
    (result,) = benchmark_inference("tiny-B/32", ("tempme",), size_attention="channels", **TINY)
    assert result.size_attention == "channels"
    assert "size attention channels" in format_results([result])
    with pytest.raises(ValueError, match="unknown size attention 'dense'"):
        benchmark_inference("tiny-B/32", ("tempme",), size_attention="dense", **TINY)


def test_attention_backend_restricts_the_kernel_and_is_recorded():
    from torch.profiler import profile

    from tempme.bench import with_attention_backend

    q = torch.randn(1, 2, 5, 8)

    def kernels(backend):
        with profile() as prof:
            with_attention_backend(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), backend, "x")()
        return {event.name for event in prof.events() if "scaled_dot_product" in event.name}

    assert any("math" in name for name in kernels("math")) and not any("flash" in name for name in kernels("math"))
    assert any("flash" in name for name in kernels("flash"))
    with pytest.raises(ValueError, match="attention backend 'efficient' cannot run 'x' here"):
        with_attention_backend(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), "efficient", "x")()
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        with_attention_backend(lambda: None, "fast", "x")
    (result,) = benchmark_inference("tiny-B/32", ("tempme",), attention_backend="math", **TINY)
    assert result.attention_backend == "math" and "attention kernel math" in format_results([result])


def test_unknown_compile_mode_is_refused_before_anything_is_built():
    with pytest.raises(ValueError, match="unknown compile mode 'fastest'"):
        benchmark_inference("tiny-B/32", ("none",), compile=True, compile_mode="fastest", **TINY)


@NO_CUDA
def test_cli_defaults_to_the_cpu_in_fp32_with_four_videos(capsys):
    assert main(["bench", "--model", "tiny-B/32", "--methods", "none", "--repeats", "1", "--warmup", "0", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert (result["device"], result["dtype"], result["batch"]) == ("cpu", "fp32", 4)


@pytest.mark.parametrize("option", ["--precision", "--dtype"])  # --dtype: its older name, which scripts use
def test_cli_takes_the_precision_by_either_name(option, capsys):
    argv = ["bench", "--model", "tiny-B/32", "--methods", "none", "--batch", "1", "--repeats", "1", "--warmup", "0",
            "--device", "cpu", "--json"]
    assert main([*argv, option, "bf16"]) == 0  # not the CPU's default, fp32
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["dtype"] == "bf16"
    with pytest.raises(SystemExit) as exit:
        main([*argv, option, "fp64"])
    assert exit.value.code == 2 and "argument --precision/--dtype: invalid choice: 'fp64'" in capsys.readouterr().err
