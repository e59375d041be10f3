"""Model-level behaviour: LoRA, trainable parameters, pooling, source tracking, input checks."""

import warnings

import pytest
import torch

import tempme
from tempme.factory import build_config
from tempme.model import TempMe, flex_size_attention, resolve_size_attention, size_weighted_attention
from tiny_models import randomise_adapters


def test_lora_starts_as_identity_and_folding_keeps_outputs():
    torch.manual_seed(0)
    model = tempme.create_model("tiny-B/32", frames=12).eval()
    video = torch.randn(2, 12, 3, 224, 224)
    ids, mask = model.tokenize(["a dog runs", "two cats sleep on a sofa"])
    with torch.no_grad():
        plain_video, plain_text = model.encode_video(video), model.encode_text(ids, mask)
        without_lora = tempme.create_model("tiny-B/32", frames=12, lora_rank=0).eval()
        without_lora.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k})
        torch.testing.assert_close(without_lora.encode_video(video), plain_video)  # B = 0 at init
        torch.testing.assert_close(without_lora.encode_text(ids, mask), plain_text)
        randomise_adapters(model, clip_pos=False)
        adapted_video, adapted_text = model.encode_video(video), model.encode_text(ids, mask)
        assert not torch.allclose(adapted_video, plain_video, atol=1e-4)
        model.fold_lora()
        assert not any("lora" in name for name, _ in model.named_parameters())
        torch.testing.assert_close(model.encode_video(video), adapted_video, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(ids, mask), adapted_text, atol=1e-5, rtol=1e-4)


def count_trainable(config):
    with torch.device("meta"):
        model = TempMe(config)
    counts = {"vision_lora": 0, "text_lora": 0, "cpe": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = "cpe" if "clip_pos_embed" in name else ("vision_lora" if name.startswith("visual.") else "text_lora")
        counts[key] += param.numel()
    return counts


def test_trainable_parameter_counts_match_the_paper():
    # SPEC section 4: vision LoRA 294,912, text LoRA 196,608, CPE 16,128 (12f) / 64,512 (64f).
    assert count_trainable(build_config("ViT-B/32", frames=12)) == {
        "vision_lora": 294_912, "text_lora": 196_608, "cpe": 16_128}
    assert sum(count_trainable(build_config("ViT-B/32", frames=64)).values()) == 556_032


def test_full_fine_tuning_switch_keeps_logit_scale_frozen():
    model = tempme.create_model("tiny-B/32", frames=12)
    model.set_trainable("full")
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["logit_scale"]
    with pytest.raises(ValueError, match="'lora' or 'full'"):
        model.set_trainable("everything")


def test_video_mask_averages_only_real_frames():
    torch.manual_seed(0)
    model = tempme.create_model("tiny-B/32", method="none", frames=4).eval()
    video = torch.randn(1, 4, 3, 224, 224)
    with torch.no_grad():
        per_frame = torch.cat([model.encode_video(video[:, [i] * 4]) for i in range(4)])
        masked = model.encode_video(video, torch.tensor([[1, 1, 0, 0]]))
        all_masked = model.encode_video(video, torch.zeros(1, 4))
    # Without merging, a frame's feature does not depend on the other frames.
    torch.testing.assert_close(masked[0], per_frame[:2].mean(0), atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(all_masked) == 0  # zero denominator replaced by 1


def test_source_tracking_accounts_for_every_input_patch_once():
    torch.manual_seed(0)
    model = tempme.create_model("tiny-B/32", frames=12).eval()
    with torch.no_grad():
        state = model.visual.forward_tokens(torch.randn(2, 12, 3, 224, 224), track_source=True)
    assert state.source.shape == (2, 97, 12 * 50)
    # Each input token ends in exactly one output token, and sizes count the inputs merged.
    torch.testing.assert_close(state.source.sum(1), torch.ones(2, 600))
    torch.testing.assert_close(state.source.sum(-1, keepdim=True), state.size)
    # The 12 CLS tokens come first and are each frame's own CLS token, in frame order.
    cls_sources = state.source[0, :12].argmax(-1)
    assert cls_sources.tolist() == [50 * f for f in range(12)]


def test_text_padding_does_not_change_the_feature():
    torch.manual_seed(0)
    model = randomise_adapters(tempme.create_model("tiny-B/32", frames=12), clip_pos=False).eval()
    short_ids, short_mask = tempme.tokenize(["a red square moves left"], max_words=10)
    long_ids, long_mask = tempme.tokenize(["a red square moves left"], max_words=32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text(short_ids, short_mask), model.encode_text(long_ids, long_mask), atol=1e-5, rtol=1e-4)
        strings = model.encode_text(["a red square moves left"])
    torch.testing.assert_close(strings, model.encode_text(long_ids, long_mask))


@pytest.mark.parametrize("shape,message", [
    ((2, 12, 3, 224), "frames must be shaped \\[batch, 12, 3, 224, 224\\], got \\[2, 12, 3, 224\\]"),
    ((2, 12, 1, 224, 224), "got \\[2, 12, 1, 224, 224\\]"),
    ((2, 8, 3, 224, 224), "built for 12 frames"),
])
def test_wrong_video_shapes_get_one_clear_error(shape, message):
    model = tempme.create_model("tiny-B/32", frames=12)
    with pytest.raises(ValueError, match=message):
        model.encode_video(torch.zeros(shape))
    with pytest.raises(ValueError, match=message):  # the token-level API the README shows, too
        model.visual.forward_tokens(torch.zeros(shape))


def test_wrong_mask_and_dtype_are_refused():
    model = tempme.create_model("tiny-B/32", frames=12)
    with pytest.raises(ValueError, match="video mask must be shaped \\[1, 12\\]"):
        model.encode_video(torch.zeros(1, 12, 3, 224, 224), torch.ones(1, 11))
    with pytest.raises(TypeError, match="float tensor of CLIP-normalised pixels, got dtype torch.uint8"):
        model.encode_video(torch.zeros(1, 12, 3, 224, 224, dtype=torch.uint8))
    with pytest.raises(ValueError, match="token ids must be shaped"):
        model.encode_text(torch.zeros(5, dtype=torch.long))


def test_unknown_preset_and_setting_are_refused():
    with pytest.raises(ValueError, match="unknown model preset 'ViT-X/99'.*ViT-B/32"):
        tempme.create_model("ViT-X/99")
    with pytest.raises(TypeError, match="unknown schedule setting"):
        tempme.create_model("tiny-B/32", merge_layer=(8, 9, 10))


@pytest.mark.parametrize("form", ["channels", "flex", "values"])
def test_size_attention_forms_equal_the_bias_form(form):
    torch.manual_seed(0)
    model = randomise_adapters(tempme.create_model("tiny-B/32", frames=12), clip_pos=False).eval()
    video = torch.randn(2, 12, 3, 224, 224)
    with torch.no_grad():
        model.visual.size_attention = "bias"
        with_bias = model.encode_video(video)
        model.visual.size_attention = form
        other = model.encode_video(video)
    torch.testing.assert_close(other, with_bias, atol=1e-5, rtol=1e-4)


def test_flex_size_attention_adds_log_sizes_and_refuses_cpu_training():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 11, 8).unbind(0)  # [batch, heads, tokens, channels]
    log_size = torch.rand(2, 11).log1p()  # [batch, keys]
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + log_size[:, None, None, :], dim=-1) @ v
    torch.testing.assert_close(flex_size_attention(q, k, v, log_size), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="'flex' cannot train on the CPU.*use 'bias'"):
        flex_size_attention(q.requires_grad_(), k, v, log_size)


@pytest.mark.parametrize("grad", [False, True])
def test_size_weighted_attention_is_proportional_attention(grad):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 11, 8, dtype=torch.float64).unbind(0)  # [batch, heads, tokens, channels]
    size = torch.randint(1, 50, (2, 11)).double()
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + size.log()[:, None, None, :], dim=-1) @ v
    if grad:
        for t in (q, k, v):
            t.requires_grad_()
    out = size_weighted_attention(q, k, v, size)
    assert out.shape == (2, 11, 3, 8)  # [batch, tokens, heads, channels]
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-12, rtol=1e-10)
    if grad:
        out.square().sum().backward()
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        q2, k2, v2 = leaves
        reference = torch.softmax(q2 @ k2.transpose(-1, -2) / 8**0.5 + size.log()[:, None, None, :], dim=-1) @ v2
        reference.transpose(1, 2).square().sum().backward()
        for got, want in zip((q, k, v), leaves):
            torch.testing.assert_close(got.grad, want.grad)


def test_size_weighted_attention_keeps_float16_in_range():
    # Sizes of thousands times values of hundreds exceed float16's 65504: the sizes are rescaled.
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 2, 7, 8).unbind(0)
    v = 300 * torch.randn(1, 2, 7, 8)
    size = torch.tensor([[1.0, 1.0, 2000.0, 3000.0, 1.0, 5.0, 700.0]])
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + size.log()[:, None, None, :], dim=-1) @ v
    out = size_weighted_attention(q.half(), k.half(), v.half(), size)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected.transpose(1, 2), atol=0.5, rtol=2e-2)


def test_flex_size_attention_encodes_one_video_on_the_cpu():
    # One video: ClipMe leaves one sequence, for which torch 2.13's CPU kernel failed to compile.
    torch.manual_seed(0)
    model = randomise_adapters(tempme.create_model("tiny-B/32", frames=12), clip_pos=False).eval()
    video = torch.randn(1, 12, 3, 224, 224)
    with torch.inference_mode():
        expected = model.encode_video(video)
        model.visual.size_attention = "flex"
        torch.testing.assert_close(model.encode_video(video), expected, atol=1e-5, rtol=1e-4)


def test_auto_size_attention_is_the_channel_on_a_gpu_and_the_bias_elsewhere():
    assert resolve_size_attention("auto", "cuda") == "channels"
    assert resolve_size_attention("auto", torch.device("cuda", 1)) == "channels"
    assert resolve_size_attention("auto", "cpu") == "bias"
    assert resolve_size_attention("channels", "cpu") == "channels"
    torch.manual_seed(0)
    model = randomise_adapters(tempme.create_model("tiny-B/32", frames=12), clip_pos=False).eval()
    video = torch.randn(1, 12, 3, 224, 224)
    with torch.no_grad():
        embeddings = {}
        for form in ("bias", "auto"):
            model.visual.size_attention = form
            embeddings[form] = model.encode_video(video)
    assert torch.equal(embeddings["auto"], embeddings["bias"])


def test_unknown_size_attention_is_refused():
    model = tempme.create_model("tiny-B/32", frames=12)
    model.visual.size_attention = "dense"
    with pytest.raises(ValueError, match="unknown size attention 'dense'.*bias, channels"):
        model.encode_video(torch.zeros(1, 12, 3, 224, 224))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_run_and_agree(dtype):
    torch.manual_seed(0)
    model = randomise_adapters(tempme.create_model("tiny-B/32", frames=12)).eval()
    video = torch.randn(2, 12, 3, 224, 224)
    with torch.no_grad():
        reference = model.encode_video(video)
        half = model.to(dtype).encode_video(video.to(dtype))
    assert half.dtype == dtype
    # Entries are about 0.15; half precision moves them by about 0.01, and a wrong method (tome
    # instead of tempme, no proportional attention) by 0.06 or more.
    torch.testing.assert_close(half.float(), reference, atol=0.025, rtol=0)
    assert torch.nn.functional.cosine_similarity(half.float(), reference).min() > 0.99


def test_optimizing_for_inference_keeps_the_embeddings():
    torch.manual_seed(0)
    model = randomise_adapters(tempme.create_model("tiny-B/32", frames=12), clip_pos=False).eval()
    video = torch.randn(2, 12, 3, 224, 224)
    ids, mask = model.tokenize(["a dog runs", "two cats sleep on a sofa"])
    with torch.no_grad():
        video_before, text_before = model.encode_video(video), model.encode_text(ids, mask)
        assert model.visual.size_attention == "bias"
        model.optimize_for_inference()
        assert model.visual.size_attention == "auto"
        assert all(isinstance(block.mlp.gelu, torch.nn.SiLU) for block in model.visual.transformer.resblocks)
        assert not any("lora" in name for name, _ in model.named_parameters())
        torch.testing.assert_close(model.encode_video(video), video_before, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(ids, mask), text_before, atol=1e-5, rtol=1e-4)
    # Its weights are no longer the checkpoint's: nothing trains, and asking for it is refused.
    assert not any(param.requires_grad for param in model.parameters())
    with pytest.raises(ValueError, match="optimised for inference .* cannot be trained; load the weights again"):
        model.set_trainable("lora")


def test_token_sizes_stay_exact_in_bfloat16():
    # Sizes count patches; bfloat16 holds integers exactly only up to 256, so they stay float32.
    torch.manual_seed(0)
    model = tempme.create_model("tiny-B/32", frames=12).to(torch.bfloat16).eval()
    with torch.no_grad():
        state = model.visual.forward_tokens(torch.randn(1, 12, 3, 224, 224, dtype=torch.bfloat16))
    assert state.size.dtype == torch.float32
    patches_per_video = 12 * 49
    assert state.size[:, state.num_cls:].sum().item() == patches_per_video


@pytest.mark.parametrize("form", ["channels", "values"])
def test_size_attention_forms_train_like_the_bias_form(form):
    torch.manual_seed(0)
    model = randomise_adapters(tempme.create_model("tiny-B/32", frames=12), clip_pos=False)
    video = torch.randn(2, 12, 3, 224, 224)
    gradients = {}
    for name in ("bias", form):
        model.zero_grad()
        model.visual.size_attention = name
        model.encode_video(video).square().sum().backward()
        gradients[name] = {param: p.grad.clone() for param, p in model.named_parameters() if p.grad is not None}
    assert any("lora_a" in name for name in gradients[form]) and any("clip_pos" in name for name in gradients[form])
    assert gradients[form].keys() == gradients["bias"].keys()
    for name, grad in gradients["bias"].items():
        torch.testing.assert_close(gradients[form][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "training, form", [(False, None), (False, "channels"), (False, "values"), (True, None), (True, "values")]
)
def test_the_video_encoder_traces_as_one_graph_for_torch_compile(training, form):
    # A static per-layer plan, no host synchronisation, no Python loop over tokens: torch.compile sees
    # the whole encoder as one graph (a break would split it and leave merges uncompiled).
    model = tempme.create_model("tiny-B/32", frames=12)
    if training:
        model.train()
    else:
        model.optimize_for_inference().eval()
    if form:
        model.visual.size_attention = form
    video = torch.randn(2, 12, 3, 224, 224)
    with torch.inference_mode(not training):
        explanation = torch._dynamo.explain(model.visual)(video)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_the_compiled_encoder_gives_the_eager_embeddings():
    # torch.compile is one of the optimised paths: its fused kernels must give the same embeddings
    # (about a minute on 2 CPU cores, most of it compiling). On a GPU, `tempme bench --compile`
    # compares its embeddings with eager ones where it times them (cosine_vs_eager).
    torch.manual_seed(0)
    model = randomise_adapters(tempme.create_model("tiny-B/32", frames=12)).optimize_for_inference().eval()
    video = torch.randn(2, 12, 3, 224, 224)
    with torch.inference_mode():
        eager = model.visual(video)
        compiled = torch.compile(model.visual, dynamic=False)(video)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


def test_encode_video_takes_frames_to_the_models_device_as_encode_text_does():
    model = tempme.create_model("tiny-B/32", frames=2, device="meta")  # another device than the frames'
    frames, mask = torch.randn(1, 2, 3, 224, 224), torch.ones(1, 2)
    assert model.encode_video(frames, mask).device.type == "meta"
    assert model.encode_text(["a dog"]).device.type == "meta"


def test_factory_arguments_are_used_or_refused_never_ignored(tmp_path):
    from tempme.config import MergeConfig
    from tempme.factory import build_config
    from tempme.weights import save_weights

    config = build_config("tiny-B/32", method="tempme", frames=4)
    with pytest.raises(TypeError, match="a ModelConfig already holds method, frames, tome_r"):
        tempme.create_model(config, method="none", frames=8, tome_r=5)
    assert tempme.create_model(config).config == config
    tome = MergeConfig(method="tome")
    assert build_config("tiny-B/32", schedule=tome).merge.method == "tome"  # the schedule's, not a default
    with pytest.raises(ValueError, match="method 'tempme' and the schedule's method 'tome' differ"):
        build_config("tiny-B/32", method="tempme", schedule=tome)
    path = save_weights(tempme.create_model(config), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="frames must be at least 1, got 0"):  # not taken as "unset"
        tempme.load_model(path, frames=0)


def test_wrongly_typed_arguments_are_named_and_an_empty_batch_is_empty():
    for settings, message in (({"frames": 12.0}, "frames must be an integer, got 12.0"),
                              ({"merge_layers": 8}, "merge_layers must be a sequence of integers, got 8")):
        with pytest.raises((TypeError, ValueError), match=message):
            tempme.create_model("tiny-B/32", **settings)
    model = tempme.create_model("tiny-B/32", frames=2)
    assert model.encode_video(torch.randn(0, 2, 3, 224, 224)).shape == model.encode_text([]).shape == (0, 32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_before_any_work(tmp_path):
    from tempme.devices import DeviceUnavailable

    with pytest.raises(DeviceUnavailable, match="CUDA is not available"):
        tempme.create_model("tiny-B/32", frames=2, device="cuda")
    with pytest.raises(DeviceUnavailable, match="CUDA is not available"):
        tempme.load_model(tmp_path / "not-read.pt", device="cuda")  # refused before the file is looked for


def test_text_length_and_layer_counts_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"max_words must be from 3 \(start, one word, end\) to the text context length 77, got 2"):
        tempme.create_model("tiny-B/32", frames=2, max_words=2)
    model = tempme.create_model("tiny-B/32", frames=2)
    with pytest.raises(ValueError, match="layers must be from 0 to the encoder's 12, got -1"):
        model.visual.forward_tokens(torch.randn(1, 2, 3, 224, 224), layers=-1)
    assert "retrieval" in tempme.__all__


def test_clip_positional_embeddings_no_merge_reads_are_warned_about():
    # SPEC: with no cross-clip merge (r0 = 0) the CPE is not added, so it would train for nothing.
    with pytest.warns(UserWarning, match="cross_merge_ratio=0 merges nothing across clips"):
        tempme.create_model("tiny-B/32", cross_merge_ratio=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tempme.create_model("tiny-B/32", cross_merge_ratio=0.0, clip_pos_embed=False)
