"""Our encoders reproduce Hugging Face ``transformers.CLIPModel`` when loaded from its checkpoint.

A tiny random CLIPModel with tiny-B/32's shapes is saved with ``save_pretrained``, read back through
``tempme.weights`` and run in a TempMe model without merging; transformers computes the reference.
"""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from tempme.config import ModelConfig, default_merge_config, get_preset  # noqa: E402
from tempme.model import TempMe  # noqa: E402
from tempme.tokenizer import tokenize  # noqa: E402
from tempme.weights import (  # noqa: E402
    hf_config_dict,
    load_state_dict_into,
    load_weights,
    to_hf_layout,
    to_tempme_layout,
)

FRAMES = 3
CAPTIONS = ["a man is cooking pasta in a small kitchen", "a dog runs", "people are dancing at a wedding party"]


def tiny_hf_config():
    shared = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "hidden_size": 64, "num_attention_heads": 4,
              "intermediate_size": 256, "projection_dim": 32}
    return transformers.CLIPConfig(
        vision_config={**shared, "num_hidden_layers": 12, "patch_size": 32, "image_size": 224},
        # transformers pools text at argmax(input_ids) when eos_token_id is the legacy 2 (as in OpenAI's
        # published configs); otherwise at the first eos_token_id. Both are our EOT here; 2 is OpenAI's rule.
        text_config={**shared, "num_hidden_layers": 2, "vocab_size": 49408, "max_position_embeddings": 77,
                     "eos_token_id": 2},
        projection_dim=32,
    )


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.CLIPModel(tiny_hf_config()).eval()
    with torch.no_grad():
        for param in model.parameters():
            # Perturb everything (layer norms included) so that a swapped or transposed tensor shows.
            param.add_(0.05 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny-clip"
    hf_model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="module")
def ours(checkpoint):
    loaded = load_weights(checkpoint)
    assert loaded.source_format == "hf"
    assert loaded.clip_config == get_preset("tiny-B/32")
    clip = loaded.clip_config
    model = TempMe(ModelConfig(clip=clip, merge=default_merge_config(clip, FRAMES, "none"), frames=FRAMES))
    not_loaded = load_state_dict_into(model, loaded.state_dict)
    assert not_loaded and all("lora" in name for name in not_loaded)  # LoRA stays at B = 0, a no-op
    return model.eval()


def test_video_embedding_matches_hf_image_features(hf_model, ours):
    frames = torch.randn(2, FRAMES, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        per_frame = hf_model.get_image_features(pixel_values=frames.flatten(0, 1)).pooler_output
        expected = F.normalize(per_frame, dim=-1).view(2, FRAMES, -1).mean(dim=1)
        actual = ours.encode_video(frames)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_text_embedding_matches_hf_text_features(hf_model, ours):
    ids, mask = tokenize(CAPTIONS, max_words=32)
    assert (ids == 0).any()  # zero padding is part of what is compared
    with torch.no_grad():
        expected = hf_model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        actual = ours.encode_text(ids, mask)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_round_trip_through_hf_layout(hf_model, ours):
    ours_sd = {name: tensor for name, tensor in ours.state_dict().items() if "lora" not in name}
    fresh = transformers.CLIPModel(transformers.CLIPConfig(**hf_config_dict(ours.config.clip)))
    fresh.load_state_dict(to_hf_layout(ours.state_dict()), strict=True)
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    back = to_tempme_layout(fresh.state_dict())
    assert sorted(back) == sorted(ours_sd)
    for name, tensor in ours_sd.items():
        assert torch.equal(back[name], tensor), name
