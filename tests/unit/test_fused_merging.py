"""The fused Triton kernels make the same merges as the tensor operations of ``tempme.merging``.

Where no GPU is, Triton's interpreter runs the kernels on CPU tensors (``TRITON_INTERPRET=1``, which
tests/conftest.py sets before Triton is imported). It runs every program in Python, so the shapes
here stay small. What only the compiler checks (types, loops), another process checks by compiling
the kernels for an H100, which needs no GPU either.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import tempme  # noqa: E402
from tempme import merging  # noqa: E402
from tempme.merging import (  # noqa: E402
    bipartite_soft_matching,
    match_patches,
    merge_weighted,
    normalized_patches,
    use_fused_kernels,
)

from tiny_models import randomise_adapters  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module", autouse=True)
def fused_merging():
    """The kernels' module (interpreted on a CPU-only machine: tests/conftest.py)."""
    module = merging.fused_kernels()
    assert module.supports(DEVICE), f"the fused kernels cannot run on {DEVICE} (is TRITON_INTERPRET=1 unset?)"
    return module


def plan_pairs(plan, sequence):
    """(source row, destination row) of every merge of one sequence, sorted."""
    rows = slice(sequence * plan.r, (sequence + 1) * plan.r)
    return sorted(zip(plan.src_rows[rows].tolist(), plan.dst_rows[rows].tolist()))


# (CLS tokens, tokens, r): one and several CLS tokens of both parities (A first or B first), an odd
# and an even number of patches, r from 0 to half the patches.
SHAPES = [(1, 17, 5), (1, 18, 8), (2, 20, 9), (2, 21, 0), (3, 30, 13), (4, 9, 2), (1, 3, 1), (1, 50, 24)]


@pytest.mark.parametrize("num_cls, tokens, r", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_fused_plans_merge_the_same_tokens(num_cls, tokens, r, ties):
    generator = torch.Generator().manual_seed(tokens + r)
    if ties:  # few distinct directions: many A tokens share their best score, and ties go to the lower position
        metric = torch.randint(0, 2, (3, tokens, 6), generator=generator).float() + 0.01
    else:
        metric = torch.randn(3, tokens, 6, generator=generator)
    metric = metric.to(DEVICE)
    reference = bipartite_soft_matching(metric, r, num_cls)
    fused = bipartite_soft_matching(metric, r, num_cls, fused=True)

    assert torch.equal(fused.keep_rows, reference.keep_rows)  # same survivors, in the same order
    for sequence in range(3):
        assert plan_pairs(fused, sequence) == plan_pairs(reference, sequence)
    # Listed by destination, and each output row's run of sources is exactly the tokens merged into it.
    assert fused.dst_rows.tolist() == sorted(fused.dst_rows.tolist())
    start, stop = fused.source_start.tolist(), fused.source_stop.tolist()
    for row in range(fused.keep_rows.numel()):
        into_row = [i for i, dst in enumerate(fused.dst_rows.tolist()) if dst == row]
        assert list(range(start[row], stop[row])) == into_row


def test_a_metric_that_overflowed_plans_as_the_tensor_operations_do():
    # An infinite key gives NaN similarities, which torch's sort ranks first: the fused plan must still
    # merge r tokens and keep the rest (a NaN that no comparison picks would leave a hole in the plan).
    generator = torch.Generator().manual_seed(5)
    metric = torch.randn(2, 11, 4, generator=generator)
    metric[0, 4, 0] = float("inf")
    metric[1, 3, 1] = float("-inf")
    metric = metric.to(DEVICE)
    reference = bipartite_soft_matching(metric, 5, 1)
    fused = bipartite_soft_matching(metric, 5, 1, fused=True)
    assert torch.equal(fused.keep_rows, reference.keep_rows)
    assert all(plan_pairs(fused, s) == plan_pairs(reference, s) for s in range(2))


@pytest.mark.parametrize("sized", [False, True])
def test_fused_merges_average_like_the_tensor_operations(sized):
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 25, 4, generator=generator).to(DEVICE)
    x = torch.randn(2, 25, 12, generator=generator).to(DEVICE)
    # Sizes are whole patch counts: their sums are exact in float32 in any order.
    size = torch.randint(1, 6, (2, 25, 1), generator=generator).float().to(DEVICE) if sized else None
    reference = bipartite_soft_matching(keys, 10, 1)
    fused = bipartite_soft_matching(keys, 10, 1, fused=True)
    expected_x, expected_size, _ = merge_weighted(reference, x, size)
    merged, new_size, _ = merge_weighted(fused, x, size)
    torch.testing.assert_close(merged, expected_x, atol=1e-6, rtol=1e-6)
    assert torch.equal(new_size, expected_size)


def half_precision_merge(dtype):
    """A merge of ``dtype`` tokens: the fused result, the tensor operations' and the exact average of
    the same rounded inputs (computed in float64)."""
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(2, 41, 8, generator=generator).to(DEVICE)
    x = torch.randn(2, 41, 16, generator=generator).to(DEVICE, dtype)
    size = torch.randint(1, 9, (2, 41, 1), generator=generator).float().to(DEVICE)
    plan = bipartite_soft_matching(keys, 20, 1)
    exact = merge_weighted(plan, x.double(), size)[0]
    fused = merge_weighted(bipartite_soft_matching(keys, 20, 1, fused=True), x, size)[0]
    return fused, merge_weighted(plan, x, size)[0], exact


def test_fused_merges_in_float16_round_once():
    # The kernel averages in float32 and rounds once, to the nearest float16 of the exact average but
    # for rare float32 ties; the tensor operations round at every step (a quarter of them differ here).
    fused, stepwise, exact = half_precision_merge(torch.float16)
    assert fused.dtype == torch.float16
    assert (fused != exact.half()).float().mean() < 0.01
    assert (stepwise != exact.half()).float().mean() > 0.05  # so the check above can tell them apart


def test_fused_merges_in_bfloat16_stay_within_a_rounding():
    # Triton's interpreter truncates float32 to bfloat16 where a GPU rounds to nearest: one unit in
    # the last place of values up to about 4, not a rounding-once check.
    fused, _, exact = half_precision_merge(torch.bfloat16)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.double(), exact, atol=4 * torch.finfo(torch.bfloat16).eps, rtol=0)


def test_wide_and_strided_tokens_and_float64_merge_alike():
    # More channels than one block of the kernel (1024), tokens and sizes that are views of other
    # layouts, and float64, which the fused plan hands to the tensor operations to keep its precision.
    generator = torch.Generator().manual_seed(6)
    keys = torch.randn(2, 75, 8, generator=generator).to(DEVICE)
    x = torch.randn(2, 1280, 75, generator=generator).to(DEVICE).transpose(1, 2)
    size = torch.randint(1, 5, (2, 1, 75), generator=generator).float().to(DEVICE).transpose(1, 2)
    reference, fused = bipartite_soft_matching(keys, 30, 1), bipartite_soft_matching(keys, 30, 1, fused=True)
    torch.testing.assert_close(merge_weighted(fused, x, size)[0], merge_weighted(reference, x, size)[0],
                               atol=1e-6, rtol=1e-6)
    wide = x.double()  # float32 arithmetic would be 1e-7 off; summed in another order, 1e-16
    torch.testing.assert_close(merge_weighted(fused, wide, size)[0], merge_weighted(reference, wide, size)[0],
                               atol=1e-12, rtol=1e-12)


def test_fused_merge_gradients_equal_the_tensor_operations():
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(3, 19, 4, generator=generator).to(DEVICE)
    x = torch.randn(3, 19, 8, generator=generator).to(DEVICE)
    size = torch.randint(1, 4, (3, 19, 1), generator=generator).float().to(DEVICE)
    upstream = torch.randn(3, 19 - 7, 8, generator=generator).to(DEVICE)
    gradients = []
    for fused in (False, True):
        leaf = x.clone().requires_grad_()
        merged, _, _ = merge_weighted(bipartite_soft_matching(keys, 7, 1, fused), leaf, size)
        merged.backward(upstream)
        gradients.append(leaf.grad)
    torch.testing.assert_close(gradients[1], gradients[0], atol=1e-6, rtol=1e-6)


def test_cross_clip_metrics_plan_alike():
    # ClipMe matches joined clips with several CLS tokens, on normalised hidden states.
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(6, 11, 8, generator=generator).to(DEVICE)
    patches = normalized_patches(hidden, 1).view(2, -1, 8)
    reference, fused = match_patches(patches, 9, 3), match_patches(patches, 9, 3, fused=True)
    assert torch.equal(fused.keep_rows, reference.keep_rows)
    assert all(plan_pairs(fused, s) == plan_pairs(reference, s) for s in range(2))


@pytest.mark.parametrize("method", ["tempme", "tome"])
def test_an_encoder_with_fused_merges_gives_the_same_embeddings(method):
    torch.manual_seed(0)
    model = randomise_adapters(tempme.create_model("tiny-B/32", method=method, frames=4)).to(DEVICE).eval()
    video = torch.randn(1, 4, 3, 224, 224, device=DEVICE)
    with torch.no_grad():
        expected = model.visual.forward_tokens(video, track_source=True)
        model.visual.merge_kernels = "triton"
        fused = model.visual.forward_tokens(video, track_source=True)
    torch.testing.assert_close(fused.x, expected.x, atol=1e-5, rtol=1e-5)
    assert torch.equal(fused.size, expected.size) and torch.equal(fused.source, expected.source)


def test_training_through_fused_merges_gives_the_same_gradients():
    torch.manual_seed(0)
    model = randomise_adapters(tempme.create_model("tiny-B/32", frames=4)).to(DEVICE)
    video = torch.randn(1, 4, 3, 224, 224, device=DEVICE)
    gradients = []
    for kernels in ("torch", "triton"):
        model.zero_grad()
        model.visual.merge_kernels = kernels
        model.encode_video(video).square().sum().backward()
        gradients.append({n: p.grad.clone() for n, p in model.visual.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and gradients[0]
    for name, expected in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], expected, atol=1e-5, rtol=1e-4, msg=name)


def test_unknown_or_unavailable_merge_kernels_are_refused(fused_merging, monkeypatch):
    with pytest.raises(ValueError, match="unknown merge kernels 'cuda'; choose one of torch, triton, auto"):
        use_fused_kernels("cuda", DEVICE)
    assert use_fused_kernels("torch", DEVICE) is False
    assert use_fused_kernels("auto", "cpu") is False  # interpreted kernels are for tests, not for use
    assert use_fused_kernels("auto", DEVICE) is (DEVICE.type == "cuda")
    monkeypatch.setattr(fused_merging, "INTERPRETED", False)
    with pytest.raises(ValueError, match="merge kernels 'triton' run on CUDA devices, not cpu"):
        use_fused_kernels("triton", "cpu")
    # Without Triton: one error the command line shows as such (a ValueError), not a traceback.
    real_find_spec = merging.importlib.util.find_spec
    monkeypatch.setattr(merging.importlib.util, "find_spec",
                        lambda name: None if name == "triton" else real_find_spec(name))
    merging.fused_kernels.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"merge kernels 'triton' need Triton \(pip install triton"):
            use_fused_kernels("triton", DEVICE)
    finally:
        merging.fused_kernels.cache_clear()


# Compiles the kernels as a GPU run would, down to an H100's machine code (Triton's own ptxas), with
# no GPU: Triton compiles (not interprets) only where TRITON_INTERPRET is unset, so in another process.
COMPILE_FOR_H100 = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tempme import fused_merging as fused

    def compile(kernel, signature, constants):
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        assert "cubin" in triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm

    rows = {"keep_ptr": "*i64", "src_ptr": "*i64", "start_ptr": "*i32", "stop_ptr": "*i32"}
    for scores in ("fp32", "fp64"):
        plan = {"score_ptr": "*" + scores, "best_b_ptr": "*i64", "dst_ptr": "*i64", **rows,
                **dict.fromkeys(["num_a", "num_b", "r", "num_cls", "tokens_in", "a_first", "b_first"], "i32"),
                **dict.fromkeys(["BLOCK_A", "BLOCK_B", "BLOCK_CLS"], "constexpr")}
        for block in (2, 128, 1024) if scores == "fp32" else (128,):
            compile(fused._plan_kernel, plan, {"BLOCK_A": block, "BLOCK_B": block, "BLOCK_CLS": 2})
    for dtype in ("bf16", "fp16", "fp32"):
        merge = {"x_ptr": "*" + dtype, "size_ptr": "*fp32", **rows, "out_ptr": "*" + dtype, "new_size_ptr": "*fp32",
                 "share_ptr": "*fp32", "channels": "i32", "HAS_SIZE": "constexpr", "BLOCK_C": "constexpr"}
        for sized in (False, True):
            compile(fused._merge_kernel, merge, {"HAS_SIZE": sized, "BLOCK_C": 1024})
        backward = {"grad_ptr": "*" + dtype, **rows, "share_ptr": "*fp32", "grad_x_ptr": "*" + dtype,
                    "channels": "i32", "BLOCK_C": "constexpr"}
        compile(fused._merge_backward_kernel, backward, {"BLOCK_C": 1024})
    print("compiled")
    """
)


def test_the_kernels_compile_for_an_h100():
    # The interpreter runs Python, not the compiler: a kernel it runs may still fail to compile.
    src = Path(__file__).parents[2] / "src"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns while the default is unset
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "compiled", done.stderr[-3000:]
