"""GPU paths: CUDA graph replay, half-precision attention and FlexAttention agree with the eager reference.

The tests marked ``needs_cuda`` run where a GPU is (scripts/gpu_bench.sh runs this file first on the
GPU machine); on a CPU-only machine only the error checks run.
"""

import pytest
import torch

import tempme
from tempme.bench import benchmark_inference, make_training_step
from tempme.cuda_graph import GraphedForward, graph_for_training
from tiny_models import randomise_adapters

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_encoder(dtype=torch.float32, device="cuda"):
    torch.manual_seed(0)
    model = randomise_adapters(tempme.create_model("tiny-B/32", frames=12), clip_pos=False)  # folding matters
    return model.optimize_for_inference().visual.to(device=device, dtype=dtype).eval()


def test_graphs_refuse_cpu_inputs():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA input"):
        GraphedForward(torch.nn.Identity(), torch.zeros(2))


def test_training_graphs_refuse_cpu_inputs():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA input"):
        graph_for_training(torch.nn.Linear(2, 2), torch.zeros(2))


def test_bench_refuses_graphs_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the error raised where CUDA is missing")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        benchmark_inference("tiny-B/32", ("none",), cuda_graph=True, batch=1, repeats=1, warmup=0)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_eager(dtype):
    encoder = tiny_encoder(dtype)
    first, second = (torch.randn(3, 12, 3, 224, 224, device="cuda", dtype=dtype) for _ in range(2))
    with torch.inference_mode():
        expected_first, expected_second = encoder(first), encoder(second)
    graphed = GraphedForward(encoder, first)
    # float32 must match; in bfloat16 a captured matrix product may pick another cuBLAS algorithm,
    # and a rounding difference can flip a near-tied merge (seen on an H100: 0.008 at most).
    tolerance = {} if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    torch.testing.assert_close(graphed(first).clone(), expected_first, **tolerance)
    torch.testing.assert_close(graphed(second).clone(), expected_second, **tolerance)  # new input, same graph
    with pytest.raises(ValueError, match="captured for inputs"):
        graphed(first[:2])


@needs_cuda
def test_bench_compares_graph_embeddings_with_eager_ones():
    results = benchmark_inference("tiny-B/32", ("none", "tempme"), frames=12, batch=3, device="cuda", dtype="bf16",
                                  cuda_graph=True, repeats=1, warmup=0)
    assert all(0.99 <= r.cosine_vs_eager <= 1.0 + 1e-3 for r in results), [r.cosine_vs_eager for r in results]


@needs_cuda
def test_graph_replay_with_flex_attention_equals_eager():
    # FlexAttention's kernel is compiled in the warm-up calls, before the capture.
    encoder = tiny_encoder(torch.bfloat16)
    encoder.size_attention = "flex"
    video = torch.randn(3, 12, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = encoder(video)
    torch.testing.assert_close(GraphedForward(encoder, video)(video).clone(), expected, atol=0.05, rtol=0.05)


@needs_cuda
def test_fused_merges_replay_in_a_graph_and_agree_in_bfloat16():
    video = torch.randn(3, 12, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        reference = tiny_encoder(torch.float32)(video)  # tensor operations, float32
        encoder = tiny_encoder(torch.bfloat16)
        encoder.merge_kernels = "triton"
        eager = encoder(video.bfloat16())
    graphed = GraphedForward(encoder, video.bfloat16())(video.bfloat16()).clone()
    torch.testing.assert_close(eager.float(), reference, atol=0.05, rtol=0.05)
    torch.testing.assert_close(graphed, eager, atol=0.05, rtol=0.05)


@needs_cuda
def test_bench_times_the_fused_kernels():
    results = benchmark_inference("tiny-B/32", ("none", "tempme"), frames=12, batch=3, device="cuda", dtype="bf16",
                                  cuda_graph=True, repeats=1, warmup=0, merge_kernels="triton")
    assert [r.merge_kernels for r in results] == ["triton", "triton"]
    assert all(0.99 <= r.cosine_vs_eager <= 1.0 + 1e-3 for r in results), [r.cosine_vs_eager for r in results]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda_agrees_with_float32(dtype):
    video = torch.randn(2, 12, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        reference = tiny_encoder(torch.float32)(video)
        bias_encoder = tiny_encoder(dtype)
        bias_encoder.size_attention = "bias"  # optimize_for_inference's "auto" is the channel on a GPU
        half_bias = bias_encoder(video.to(dtype))
        other_forms = {}
        for form in ("channels", "flex", "values"):
            encoder = tiny_encoder(dtype)
            encoder.size_attention = form
            other_forms[form] = encoder(video.to(dtype))
    torch.testing.assert_close(half_bias.float(), reference, atol=0.05, rtol=0.05)
    for form, embeddings in other_forms.items():
        torch.testing.assert_close(embeddings.float(), half_bias.float(), atol=0.05, rtol=0.05, msg=form)


@needs_cuda
@pytest.mark.parametrize("form", ["flex", "values"])
def test_size_attention_form_trains_like_the_bias_on_cuda(monkeypatch, form):
    # FlexAttention's backward exists on the GPU only (on the CPU the form refuses to train); the
    # size-weighted values need a kernel whose backward takes value heads wider than key heads.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    video = torch.randn(2, 12, 3, 224, 224, device="cuda")
    torch.manual_seed(0)
    model = tempme.create_model("tiny-B/32", frames=12).cuda().train()
    gradients = {}
    for name in ("bias", form):
        model.zero_grad()
        model.visual.size_attention = name
        model.encode_video(video).square().sum().backward()
        gradients[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert gradients[form].keys() == gradients["bias"].keys()
    for name, grad in gradients["bias"].items():
        torch.testing.assert_close(gradients[form][name], grad, atol=1e-4, rtol=1e-3, msg=name)


@needs_cuda
def test_size_weighted_values_give_the_bias_forms_embeddings_in_bfloat16():
    # Through whichever kernel SDPA picks on this GPU for value heads wider than key heads.
    video = torch.randn(3, 12, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    embeddings = {}
    with torch.inference_mode():
        for form in ("bias", "values"):
            encoder = tiny_encoder(torch.bfloat16)
            encoder.size_attention = form
            embeddings[form] = encoder(video).float()
    torch.testing.assert_close(embeddings["values"], embeddings["bias"], atol=0.05, rtol=0.05)


@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "cudnn", "efficient", "math"])
def test_values_wider_than_keys_at_vit_b_head_sizes(backend):
    # ViT-B/16's heads: queries and keys 64 wide, values 72 (64 + the size column, padded). Which
    # kernels take them, forward and backward, in bf16: the timed runs use "auto" (torch's choice).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q, k = (torch.randn(4, 12, 197, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(4, 12, 197, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    reference = torch.softmax(q.float() @ k.float().transpose(-1, -2) / 8, dim=-1) @ v.float()
    kernels = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH}
    # "auto" offers FlashAttention too, as the model's calls do: it refuses such heads, and SDPA must move on.
    allowed = [SDPBackend.FLASH_ATTENTION, *kernels.values()] if backend == "auto" else [kernels[backend]]
    with sdpa_kernel(allowed):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.float().square().sum().backward()
    torch.testing.assert_close(out.float(), reference, atol=0.03, rtol=0.03)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@needs_cuda
def test_size_weighted_values_in_bfloat16_under_autocast_training():
    # As tempme bench --train --size-attention values runs it: float32 weights, bf16 attention.
    torch.manual_seed(0)
    model = tempme.create_model("tiny-B/32", frames=12).cuda().train()
    model.visual.size_attention = "values"
    video = torch.randn(2, 12, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.encode_video(video).float().square().sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@needs_cuda
def test_cuda_float32_matches_cpu(monkeypatch):
    # Full float32 everywhere: no TF32 in matrix products or cuDNN kernels. Each device runs its "auto"
    # size attention, as users get it: the channel on the GPU, the bias on the CPU.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    video = torch.randn(2, 12, 3, 224, 224)
    with torch.inference_mode():
        cpu = tiny_encoder(device="cpu")(video)
        cuda = tiny_encoder()(video.cuda()).cpu()
    torch.testing.assert_close(cuda, cpu, atol=2e-3, rtol=2e-3)


@needs_cuda
@pytest.mark.parametrize("segment_s", [None, 2.0])
def test_index_on_the_gpu_in_bf16_matches_the_cpu_in_fp32(tmp_path, segment_s):
    from data_fixtures import write_video

    from tempme.search import VideoIndex, update_index

    videos = [write_video(tmp_path / f"clip{i}.mp4", num_frames=20 + 10 * i) for i in range(3)]
    torch.manual_seed(0)
    model = tempme.create_model("tiny-B/32", frames=12).eval()
    update_index(model, videos, tmp_path / "cpu.index", progress=False, segment_s=segment_s)
    update_index(model, videos, tmp_path / "gpu.index", device="cuda", precision="bf16", progress=False,
                 segment_s=segment_s)
    cpu, gpu = VideoIndex.load(tmp_path / "cpu.index"), VideoIndex.load(tmp_path / "gpu.index")
    assert gpu.paths == cpu.paths and gpu.spans == cpu.spans and gpu.settings["precision"] == "bf16"
    torch.testing.assert_close(gpu.embeddings, cpu.embeddings, atol=0.05, rtol=0)


@needs_cuda
def test_training_gradients_on_cuda_match_the_cpu(monkeypatch):
    # The merge's own backward pass (WeightedMerge) and the clip joins under autograd, on the GPU.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    video = torch.randn(2, 12, 3, 224, 224)
    gradients = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = randomise_adapters(tempme.create_model("tiny-B/32", frames=12)).to(device).train()
        model.encode_video(video.to(device)).square().sum().backward()
        gradients[device] = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    assert any("clip_pos" in name for name in gradients["cuda"])
    assert gradients["cuda"].keys() == gradients["cpu"].keys()
    for name, grad in gradients["cpu"].items():
        torch.testing.assert_close(gradients["cuda"][name], grad, atol=1e-3, rtol=1e-2, msg=name)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matching_on_cuda_uses_the_cpu_arithmetic(dtype):
    # On a GPU a half-precision metric stays half (rounded once) and its similarities come out of one
    # tensor-core product in float32: the CPU's arithmetic (exact products, float32 sums).
    from tempme.merging import match_patches, normalized_patches, patch_similarities

    torch.manual_seed(0)
    metric = torch.randn(24, 50, 64).to(dtype)
    patches = normalized_patches(metric.cuda(), num_cls=1)
    assert patches.dtype == dtype
    # The GPU sums the norm in another order: a quotient may round to the neighbouring half value.
    expected = normalized_patches(metric, num_cls=1, dtype=dtype)
    torch.testing.assert_close(patches.cpu(), expected, rtol=2**-7, atol=0)
    a, b = patches[:, 1::2], patches[:, 0::2]  # strided views, as matching reads them
    scores = patch_similarities(a, b)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.cpu(), patch_similarities(a.cpu(), b.cpu()), atol=1e-6, rtol=1e-6)
    with torch.autocast("cuda", dtype=dtype):  # a float32 metric (hidden states) under autocast: the same
        assert normalized_patches(metric.float().cuda(), num_cls=1).dtype == dtype
        assert patch_similarities(a, b).dtype == torch.float32
    plan, reference = match_patches(patches, 10, 1), match_patches(patches.cpu(), 10, 1)
    same_tokens = (plan.src.sort().values.cpu() == reference.src.sort().values).all(dim=1)
    assert same_tokens.float().mean() > 0.9  # the merged A tokens of each sequence; a near-tie may differ


@needs_cuda
def test_a_gpu_the_machine_lacks_is_a_clear_error():
    from tempme.devices import DeviceUnavailable, resolve_device

    count = torch.cuda.device_count()
    with pytest.raises(DeviceUnavailable, match=f"this machine has {count} GPU.*cuda:{count} does not exist"):
        resolve_device(f"cuda:{count}")


@needs_cuda
@pytest.mark.parametrize("method, merge_kernels", [("tempme", "torch"), ("merge-free", "torch"), ("tempme", "triton")])
def test_graphed_training_steps_give_the_eager_gradients(method, merge_kernels):
    """Training steps with the video encoder's forward and backward passes replayed as CUDA graphs
    give the gradients of the same steps run eagerly: in the first step (the capture) and in replays
    on new videos and weights updated in place (with ``triton``, the graphed steps merge with the
    fused kernels and the eager ones with tensor operations). In float32, where near-tied merges do not flip (in bf16 a
    captured product may round differently and flip one, which moves tempme's gradients as much as a
    stale step would). The steps are large enough that a gradient one step stale fails: checked
    against the eager gradients of consecutive steps."""
    steps = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        steps[graphed] = make_training_step("tiny-B/16", method, frames=4, batch=3, device=torch.device("cuda"),
                                            dtype=torch.float32, cuda_graph=graphed,
                                            merge_kernels=merge_kernels if graphed else "torch")
    eager, graphed = steps[False], steps[True]
    graphed.model.load_state_dict(eager.model.state_dict())
    graphed.video, graphed.captions = eager.video, eager.captions  # one tensor: new videos reach both
    with torch.no_grad():
        for step in (eager, graphed):
            # SGD, not AdamW: AdamW's first step moves every weight by lr * sign(gradient), so that
            # rounding noise in a near-zero gradient would move the two models apart.
            trainable = [p for p in step.model.parameters() if p.requires_grad]
            step.optimizer = torch.optim.SGD(trainable, lr=0.1)
            for name, parameter in step.model.named_parameters():
                if "lora_b" in name:  # LoRA starts as a no-op (B = 0): let the first gradients reach A too
                    parameter.copy_(torch.full_like(parameter, 0.01))

    def video_gradients(step):
        return {name: p.grad.flatten().clone() for name, p in step.model.visual.named_parameters()
                if p.requires_grad and p.grad is not None}

    def worst_agreement(got, expected):
        """The smallest cosine and the largest relative norm difference over the parameters."""
        cosines = [torch.nn.functional.cosine_similarity(got[n], expected[n], dim=0).item() for n in expected]
        norms = [abs(got[n].norm().item() / expected[n].norm().item() - 1) for n in expected]
        return min(cosines), max(norms)

    lora = dict(graphed.model.visual.named_parameters())["transformer.resblocks.0.attn.lora_a"]
    lora_before = lora.detach().clone()
    previous = None
    for call in range(3):
        torch.manual_seed(call)
        eager.video.copy_(torch.randn_like(eager.video))
        eager(), graphed()
        expected, got = video_gradients(eager), video_gradients(graphed)
        assert expected and got.keys() == expected.keys(), call
        cosine, norm_difference = worst_agreement(got, expected)
        assert cosine > 0.9999 and norm_difference < 1e-3, (call, cosine, norm_difference)
        if previous is not None:  # a stale gradient would be this far off: the tolerance tells it apart
            cosine, norm_difference = worst_agreement(previous, expected)
            assert cosine < 0.999 or norm_difference > 1e-2, (call, cosine, norm_difference)
        previous = expected
    assert not torch.equal(lora, lora_before)  # the replays ran on updated weights
    video, _ = graphed.forward(graphed.video, graphed.captions)
    assert type(video.grad_fn).__name__ == "GraphedBackward"  # replayed, not run eagerly
