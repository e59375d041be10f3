"""Checkpoint formats, conversion, loading errors and weight resolution (tempme.weights).

Every checkpoint here is written by the test itself from a tiny-B/32 model with random weights, in the
layout each producer uses (key names written out below, not taken from the code under test, except
the Hugging Face files, which the regression test checks against transformers itself).
"""

import json
import os
import pickle
import stat
import warnings
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tempme
from tempme.config import (
    CLIPConfig, LoRAConfig, ModelConfig, TextConfig, VisionConfig, default_merge_config, get_preset,
)
from tempme.model import TempMe, is_adapter_parameter
from tempme.weights import (
    WeightsError,
    hf_config_dict,
    infer_clip_config,
    infer_frames,
    infer_lora_rank,
    load_state_dict_into,
    load_weights,
    model_config_from_metadata,
    read_checkpoint,
    read_metadata,
    resolve_weights,
    save_weights,
    to_hf_layout,
    to_tempme_layout,
)

from file_fixtures import deny_reading

PRESET = "tiny-B/32"
FRAMES = 12  # ClipMe layers 8, 9, 10 then see 12, 6 and 3 clips
WIDTH = 64  # tiny-B/32 width of both encoders
OPENAI_INTS = {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}


def build_model(frames: int = FRAMES, method: str = "tempme", seed: int = 0, clip=None) -> TempMe:
    """A tiny model with every tensor random (adapters included), so a mix-up of any two shows."""
    clip = clip or get_preset(PRESET)
    torch.manual_seed(seed)
    model = TempMe(ModelConfig(clip=clip, merge=default_merge_config(clip, frames, method), frames=frames))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.1)
    return model


@pytest.fixture(scope="module")
def model() -> TempMe:
    return build_model()


@pytest.fixture(scope="module")
def full(model) -> dict:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def backbone(full) -> dict:
    return {name: tensor for name, tensor in full.items() if not is_adapter_parameter(name)}


# --- writers: one per producer --------------------------------------------------------------------


class _Node(nn.Module):
    """A module that only holds tensors (a level of OpenAI's module tree)."""


class _OpenAIJit(nn.Module):
    """Mirrors OpenAI CLIP's module tree, so the scripted archive has its state_dict names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_openai_jit(backbone: dict, path) -> None:
    root = _OpenAIJit()
    for name, tensor in backbone.items():
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if part not in module._modules:
                module.add_module(part, _Node())
            module = module._modules[part]
        module.register_parameter(leaf, nn.Parameter(tensor.clone()))
    for name, value in OPENAI_INTS.items():
        root.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what OpenAI ships, deprecated or not
        torch.jit.script(root).save(str(path))


def author_name(name: str) -> str:
    """Our key -> the TempMe authors' (their model wraps CLIP as ``self.clip``)."""
    name = name.replace("attn.lora_a", "attn.TVPt_LoRA_a").replace("attn.lora_b", "attn.TVPt_LoRA_b")
    return "clip." + name.replace("clip_pos_embed", "TVPt_Video_Positional_embedding")


def write_hf_dir(full: dict, path, sharded: bool = False, binary: bool = False) -> None:
    path.mkdir()
    hf = to_hf_layout(full)
    (path / "config.json").write_text(json.dumps(hf_config_dict(get_preset(PRESET))))
    if binary:
        torch.save(hf, path / "pytorch_model.bin")
    elif not sharded:
        save_file(hf, str(path / "model.safetensors"))
    else:
        names = sorted(hf)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, keys in halves.items():
            save_file({key: hf[key] for key in keys}, str(path / shard))
        weight_map = {key: shard for shard, keys in halves.items() for key in keys}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_all(model, full, backbone, root) -> dict:
    """Every format -> (path, expected state dict, expected source_format)."""
    paths = {}
    paths["openai_jit"] = root / "ViT-B-32.pt"
    write_openai_jit(backbone, paths["openai_jit"])
    paths["openai_pt"] = root / "openai_state.pt"
    torch.save({**backbone, **{k: torch.tensor(v) for k, v in OPENAI_INTS.items()}}, paths["openai_pt"])
    paths["openai_pt_legacy"] = root / "openai_legacy.pt"  # torch's format before zip archives: pickles in a row
    torch.save({**backbone, **{k: torch.tensor(v) for k, v in OPENAI_INTS.items()}}, paths["openai_pt_legacy"],
               _use_new_zipfile_serialization=False)
    paths["open_clip"] = root / "epoch_1.pt"
    wrapped = {"module." + k: v for k, v in backbone.items()}
    wrapped["module.attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)
    torch.save({"epoch": 1, "name": "tiny", "state_dict": wrapped}, paths["open_clip"])
    paths["model_wrapped"] = root / "wrapped.bin"  # named by content, not extension
    torch.save({"model": dict(backbone), "step": 10}, paths["model_wrapped"])
    paths["hf_file"] = root / "hf_model.safetensors"
    hf = to_hf_layout(full)
    hf["vision_model.embeddings.position_ids"] = torch.arange(50)[None]  # older transformers saved these
    save_file(hf, str(paths["hf_file"]))
    for name, options in (("hf_dir", {}), ("hf_sharded", {"sharded": True}), ("hf_bin", {"binary": True})):
        paths[name] = root / name
        write_hf_dir(full, paths[name], **options)
    paths["authors"] = root / "pytorch_model.bin.4"
    torch.save({author_name(k): v for k, v in full.items()}, paths["authors"])
    paths["authors_ddp"] = root / "authors_ddp.pth"
    torch.save({"module." + author_name(k): v for k, v in full.items()}, paths["authors_ddp"])
    paths["authors_legacy"] = root / "authors_legacy.bin"
    torch.save({author_name(k): v for k, v in full.items()}, paths["authors_legacy"], _use_new_zipfile_serialization=False)
    paths["ours_full"] = save_weights(model, root / "full.safetensors")
    paths["ours_adapters"] = save_weights(model, root / "adapters.safetensors", adapters_only=True)
    return paths


@pytest.fixture(scope="module")
def files(model, full, backbone, tmp_path_factory) -> dict:
    return write_all(model, full, backbone, tmp_path_factory.mktemp("ckpt"))


# (file kind, expected contents, source_format)
PLAIN_CLIP = [
    ("openai_jit", "backbone", "openai-jit"),
    ("openai_pt", "backbone", "openai"),
    ("openai_pt_legacy", "backbone", "openai"),
    ("open_clip", "backbone", "openai"),
    ("model_wrapped", "backbone", "openai"),
    ("hf_file", "backbone", "hf"),
    ("hf_dir", "backbone", "hf"),
    ("hf_sharded", "backbone", "hf"),
    ("hf_bin", "backbone", "hf"),
    ("authors", "full", "tempme-authors"),
    ("authors_ddp", "full", "tempme-authors"),
    ("authors_legacy", "full", "tempme-authors"),
    ("ours_full", "full", "tempme"),
]


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), name


# --- reading every format -------------------------------------------------------------------------


@pytest.mark.parametrize("kind, contents, source", PLAIN_CLIP)
def test_load_weights_every_format(files, full, backbone, kind, contents, source):
    loaded = load_weights(files[kind])
    assert_same_tensors(loaded.state_dict, full if contents == "full" else backbone)
    assert loaded.clip_config == get_preset(PRESET)
    assert loaded.source_format == source
    assert loaded.lora_rank == (8 if contents == "full" else 0)
    assert loaded.frames == (FRAMES if contents == "full" else None)


@pytest.mark.parametrize("kind, contents, source", PLAIN_CLIP)
def test_loaded_weights_reproduce_the_model(files, full, kind, contents, source):
    fresh = build_model(seed=1)
    not_loaded = load_state_dict_into(fresh, load_weights(files[kind]).state_dict)
    for name, tensor in fresh.state_dict().items():
        if name in not_loaded:
            continue
        assert torch.equal(tensor, full[name]), name
    if contents == "backbone":
        assert sorted(not_loaded) == sorted(n for n in full if is_adapter_parameter(n))


def test_openai_jit_drops_integer_attributes(files, backbone):
    raw = read_checkpoint(files["openai_jit"])
    assert not set(OPENAI_INTS) & set(raw)
    assert_same_tensors(raw, backbone)


class _Traced(nn.Module):
    """A traced module as OpenAI made theirs: half-precision weights, one of them stored transposed."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.inner = nn.Sequential(nn.Linear(4, 2))
        self.register_buffer("steps", torch.arange(5))
        self.register_parameter("transposed", nn.Parameter(torch.arange(6.0).reshape(2, 3).t()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.proj(x)) + self.transposed.sum()


def test_a_traced_half_precision_archive_reads_as_torch_reads_it(tmp_path):
    torch.manual_seed(0)
    module = _Traced().half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(module, torch.zeros(1, 3, dtype=torch.half)).save(str(tmp_path / "traced.pt"))
        expected = torch.jit.load(str(tmp_path / "traced.pt")).state_dict()
    read = read_checkpoint(tmp_path / "traced.pt")
    assert sorted(read) == sorted(expected)
    for name, tensor in expected.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
    assert read["transposed"].stride() == expected["transposed"].stride() == (1, 3)


class _Mischief(nn.Module):
    """A scripted module whose ``__setstate__`` (run by torch.jit.load) writes into a file."""

    def __init__(self, target: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.target = target

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return self.weight, self.target, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        written = torch.from_file(state[1], True, 4, dtype=torch.uint8)
        written.fill_(88)
        if int(written[0]) == 0:  # keeps the write from being optimised away
            print(written)
        self.weight, self.target, self.training = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_torchscript_archive_is_read_without_running_its_code(tmp_path):
    # Weights files come from others (and indexes and configs name them): opening one must run nothing.
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"safe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_Mischief(str(victim))).save(str(tmp_path / "mischief.pt"))
        torch.jit.load(str(tmp_path / "mischief.pt"))  # what tempme used to do
    assert victim.read_bytes() == b"XXXX"  # so the archive does what it says
    victim.write_bytes(b"safe")
    with pytest.raises(WeightsError, match="mischief.pt: the TorchScript archive holds no tensors tempme can read"):
        tempme.load_model(tmp_path / "mischief.pt")
    assert victim.read_bytes() == b"safe"


def test_an_archive_of_modules_shared_without_end_is_refused_at_once(tmp_path, monkeypatch):
    # Seventeen levels each naming the one below twice: 131,072 module paths from a file of a kilobyte
    # (forty would be a trillion; check_pickle_work refuses twenty already, before the archive is read).
    import sys
    import types

    module = types.ModuleType("__torch__")

    class Node:
        pass

    Node.__module__, Node.__qualname__ = module.__name__, "Node"
    module.Node = Node
    monkeypatch.setitem(sys.modules, module.__name__, module)
    below = Node()
    for _ in range(17):
        above = Node()
        above.__dict__.update(a=below, b=below)
        below = above
    archive = tmp_path / "web.pt"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("web/data.pkl", pickle.dumps(below, protocol=2))
        zipped.writestr("web/constants.pkl", pickle.dumps(()))
    with pytest.raises(WeightsError, match="web.pt: a TorchScript archive whose modules nest deeper, or repeat more"):
        read_checkpoint(archive)


def scripted_archive(path, state: bytes, storages: dict[str, bytes]) -> None:
    """A TorchScript archive whose ``data.pkl`` (protocol 2) is a module of class ``__torch__.M``
    with the pickled ``state`` (a dict's opcodes), and the given storages beside it."""
    with zipfile.ZipFile(path, "w") as zipped:
        zipped.writestr("a/data.pkl", b"\x80\x02c__torch__\nM\n)\x81" + state + b"b.")
        zipped.writestr("a/constants.pkl", b"\x80\x02).")
        for key, data in storages.items():
            zipped.writestr(f"a/data/{key}", data)


def pickled_tensor(key: str, count: int, size: list[int], stride: list[int]) -> bytes:
    """The opcodes of a float32 tensor view of storage ``key`` (``count`` values), as torch writes them."""
    def ints(values):
        return b"(" + b"".join(b"J" + v.to_bytes(4, "little", signed=True) for v in values) + b"t"

    record = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX" + len(key).to_bytes(4, "little") + key.encode() \
        + b"X\x03\x00\x00\x00cpu" + b"J" + count.to_bytes(4, "little") + b"tQ"
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + record + b"J\x00\x00\x00\x00" + ints(size) + ints(stride)
            + b"\x89ccollections\nOrderedDict\n)Rt" + b"R")


def test_a_scripted_list_of_a_stretched_tensor_s_rows_is_refused_before_it_is_built(tmp_path):
    # list(t) of a million-row view of one stored value would make a million tensors (about 600 MB).
    stretched = pickled_tensor("0", 1, [1_000_000], [0])
    state = (b"}(X\x01\x00\x00\x00w" + pickled_tensor("0", 1, [1], [1])
             + b"X\x01\x00\x00\x00lctorch.jit._pickle\nbuild_tensorlist\n(" + stretched + b"tRu")
    scripted_archive(tmp_path / "rows.pt", state, {"0": bytes(4)})
    with pytest.raises(WeightsError, match="rows.pt: corrupt TorchScript archive \\(a tensor larger than its storage"):
        read_checkpoint(tmp_path / "rows.pt")
    # The same archive with the list's tensor as stored reads as torch would.
    plain = b"}(X\x01\x00\x00\x00w" + pickled_tensor("0", 1, [1], [1]) + b"u"
    scripted_archive(tmp_path / "plain.pt", plain, {"0": bytes(4)})
    assert torch.equal(read_checkpoint(tmp_path / "plain.pt")["w"], torch.zeros(1))


def test_zip_entries_sharing_their_bytes_are_refused(tmp_path):
    # Each entry is read into memory of its own: many entries over the same bytes multiply the file.
    archive = tmp_path / "shared.pt"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("a/data/0", bytes(100_000))
        first = zipped.getinfo("a/data/0")
        for copy in range(1, 20):
            again = zipfile.ZipInfo(f"a/data/{copy}")
            again.header_offset, again.compress_size, again.file_size, again.CRC = (
                first.header_offset, first.compress_size, first.file_size, first.CRC)
            zipped.filelist.append(again)
    with pytest.raises(WeightsError, match="shared.pt: a zip archive whose entries overlap"):
        read_checkpoint(archive)


def test_tensors_claiming_more_values_than_their_file_holds_are_refused(tmp_path):
    torch.save({"w": torch.zeros(1).expand(1024, 1024)}, tmp_path / "stretched.pt")  # stride 0: 4 bytes stored
    with pytest.raises(WeightsError, match=r"stretched.pt: w claims \[1024, 1024\] values its file does not hold"):
        read_checkpoint(tmp_path / "stretched.pt")


def test_an_archive_pickling_other_objects_is_refused_with_a_way_out(tmp_path):
    archive = tmp_path / "other.pt"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("other/data.pkl", pickle.dumps(os.system))
        zipped.writestr("other/constants.pkl", pickle.dumps(()))
    with pytest.raises(WeightsError, match=r"other.pt: the TorchScript archive holds a posix.system, which tempme does "
                                           r"not read .*torch.save\(torch.jit.load\(file\).state_dict\(\), new_file\)"):
        read_checkpoint(archive)


def rewritten_record(source, target, change) -> None:
    """``source`` (a tempme weights file) saved as ``target`` with ``change`` applied to its recorded model config."""
    from safetensors.torch import load_file

    recorded = json.loads(read_metadata(source)["model_config"])
    change(recorded)
    save_file(load_file(str(source)), str(target), metadata={"format": "tempme", "model_config": json.dumps(recorded)})


def test_a_recorded_architecture_unlike_the_tensors_is_refused_before_a_model_is_built(files, tmp_path, monkeypatch):
    # A record of a 16384-wide, 40-layer encoder in a file of kilobytes would take hundreds of GB to build.
    def giant(record):
        record["clip"]["vision"].update(width=16384, layers=40)

    rewritten_record(files["ours_full"], tmp_path / "giant.safetensors", giant)
    monkeypatch.setattr(TempMe, "__init__", lambda *args, **kwargs: pytest.fail("a model was built"))
    with pytest.raises(WeightsError, match=r"giant.safetensors: its recorded model config .* is not that of its tensors"):
        tempme.load_model(tmp_path / "giant.safetensors")


def test_a_recorded_lora_rank_unlike_the_adapters_is_refused(files, tmp_path):
    def huge_rank(record):
        record["lora"]["rank"] = 10**8

    rewritten_record(files["ours_full"], tmp_path / "rank.safetensors", huge_rank)
    with pytest.raises(WeightsError, match="rank.safetensors: its recorded LoRA rank 100000000 is not that of its "
                                           "adapters"):
        tempme.load_model(tmp_path / "rank.safetensors")


def test_a_frame_size_the_patches_do_not_divide_loads_as_saved(tmp_path):
    clip = CLIPConfig(embed_dim=16, vision=VisionConfig(width=64, layers=4, heads=2, patch_size=16, image_size=40),
                      text=TextConfig(width=64, layers=1, heads=2))
    tempme.register_preset("test-40px", clip)
    model = tempme.create_model("test-40px", method="none", frames=2)
    save_weights(model, tmp_path / "w.safetensors")
    assert tempme.load_model(tmp_path / "w.safetensors").config.clip == clip


def test_frame_counts_beyond_any_use_are_refused_before_a_model_is_built(files, tmp_path):
    def many_frames(record):
        record["frames"] = 10**9

    rewritten_record(files["ours_full"], tmp_path / "frames.safetensors", many_frames)
    with pytest.raises(ValueError, match="frames must be at most 4096, got 1000000000"):
        tempme.load_model(tmp_path / "frames.safetensors")
    with pytest.raises(ValueError, match="frames must be at most 4096, got 5000"):
        tempme.create_model(PRESET, frames=5000)


def test_open_clip_extras_dropped(files):
    raw = read_checkpoint(files["open_clip"])
    assert "module.attn_mask" in raw
    converted = to_tempme_layout(raw)
    assert "attn_mask" not in converted and not any(k.startswith("module.") for k in converted)


def test_our_metadata_round_trip(model, files):
    meta = read_metadata(files["ours_full"])
    assert meta["format"] == "tempme"
    config = model_config_from_metadata(meta)
    assert config == model.config
    assert isinstance(config.merge.clips_joined, tuple) and config.merge.clips_joined == (2, 2, 3)
    assert model_config_from_metadata({"format": "pt"}) is None


def test_adapters_only_checkpoint(model, files, full, backbone):
    loaded = load_weights(files["ours_adapters"])
    assert_same_tensors(loaded.state_dict, {k: v for k, v in full.items() if is_adapter_parameter(k)})
    assert loaded.model_config == model.config and loaded.clip_config == get_preset(PRESET)
    assert (loaded.lora_rank, loaded.frames) == (8, FRAMES)
    fresh = build_model(seed=2)
    with pytest.raises(WeightsError, match="adapters-only"):
        load_state_dict_into(fresh, loaded.state_dict)
    load_state_dict_into(fresh, {**backbone, **loaded.state_dict}, strict_adapters=True)
    assert_same_tensors(fresh.state_dict(), full)


def test_save_weights_extra_metadata_and_no_leftovers(model, tmp_path):
    path = save_weights(model, tmp_path / "sub" / "w.safetensors", extra_metadata={"epoch": 3, "note": "hi"})
    meta = read_metadata(path)
    assert (meta["epoch"], meta["note"]) == ("3", "hi")
    assert os.listdir(path.parent) == ["w.safetensors"]


def test_save_weights_gives_the_mode_of_a_plain_write_and_keeps_a_changed_one(model, tmp_path):
    previous = os.umask(0o027)
    try:
        path = save_weights(model, tmp_path / "best.safetensors", adapters_only=True)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 less the umask, not mkstemp's 0o600
        path.chmod(0o644)
        save_weights(model, path, adapters_only=True)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(previous)


@pytest.mark.parametrize("read", [read_metadata, load_weights], ids=["read_metadata", "load_weights"])
def test_an_unreadable_file_is_reported_as_unreadable_not_missing(files, tmp_path, monkeypatch, read):
    path = tmp_path / "best.safetensors"
    path.write_bytes(files["ours_adapters"].read_bytes())
    deny_reading(path, monkeypatch)
    with pytest.raises(WeightsError) as caught:
        read(path)
    assert str(caught.value) == f"{path}: cannot read (Permission denied)"


# --- conversion details, written out independently ------------------------------------------------


def test_hf_layout_splits_qkv_and_transposes_projections(full):
    hf = to_hf_layout(full)
    fused = full["visual.transformer.resblocks.3.attn.in_proj_weight"]
    layer = "vision_model.encoder.layers.3.self_attn."
    assert torch.equal(hf[layer + "q_proj.weight"], fused[:WIDTH])
    assert torch.equal(hf[layer + "k_proj.weight"], fused[WIDTH : 2 * WIDTH])
    assert torch.equal(hf[layer + "v_proj.weight"], fused[2 * WIDTH :])
    bias = full["transformer.resblocks.1.attn.in_proj_bias"]
    assert torch.equal(hf["text_model.encoder.layers.1.self_attn.k_proj.bias"], bias[WIDTH : 2 * WIDTH])
    assert torch.equal(hf["visual_projection.weight"], full["visual.proj"].T)
    assert torch.equal(hf["text_projection.weight"], full["text_projection"].T)
    assert torch.equal(hf["vision_model.pre_layrnorm.weight"], full["visual.ln_pre.weight"])
    assert torch.equal(hf["text_model.encoder.layers.0.mlp.fc2.bias"], full["transformer.resblocks.0.mlp.c_proj.bias"])
    assert torch.equal(hf["text_model.final_layer_norm.bias"], full["ln_final.bias"])
    assert not any("lora" in k or "clip_pos" in k for k in hf)


def test_hf_config_dict(full):
    config = hf_config_dict(get_preset(PRESET))
    vision, text = config["vision_config"], config["text_config"]
    assert config["projection_dim"] == 32
    assert (vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]) == (64, 256, 12)
    assert (vision["num_attention_heads"], vision["patch_size"], vision["image_size"]) == (4, 32, 224)
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (64, 2, 4)
    assert (text["max_position_embeddings"], text["vocab_size"]) == (77, 49408)
    assert vision["hidden_act"] == text["hidden_act"] == "quick_gelu"
    assert text["layer_norm_eps"] == 1e-5


def test_incomplete_hf_attention_is_an_error(full):
    hf = to_hf_layout(full)
    del hf["vision_model.encoder.layers.2.self_attn.v_proj.weight"]
    with pytest.raises(WeightsError, match="resblocks.2.attn.in_proj_weight"):
        to_tempme_layout(hf)


# --- architecture inference -----------------------------------------------------------------------


def test_infer_config_rules(backbone, full):
    assert infer_clip_config(backbone) == get_preset(PRESET)  # preset match supplies heads 4 / 4
    hinted = infer_clip_config(backbone, heads=(2, 8))
    assert (hinted.vision.heads, hinted.text.heads) == (2, 8)
    assert (infer_lora_rank(backbone), infer_frames(backbone)) == (0, None)
    assert (infer_lora_rank(full), infer_frames(full)) == (8, FRAMES)


def test_infer_config_without_preset_uses_openai_heads_and_warns_that_it_guessed():
    tiny = get_preset(PRESET)
    clip = CLIPConfig(embed_dim=32, vision=tiny.vision, text=TextConfig(width=128, layers=3, heads=2))
    sd = build_model(frames=4, method="none", clip=clip).state_dict()
    # Nothing in the file says the heads, and a wrong count gives wrong embeddings without an error.
    with pytest.warns(UserWarning) as caught:
        inferred = infer_clip_config(sd, source="odd.pt")
    assert (inferred.text.width, inferred.text.layers, inferred.text.heads) == (128, 3, 2)  # 128 // 64
    assert (inferred.vision.width, inferred.vision.heads) == (64, 1)
    (message,) = [str(warning.message) for warning in caught]  # one for both encoders
    assert message.startswith("odd.pt: the head counts are not recorded, and no published CLIP has these widths: "
                              "assuming 64-wide heads (vision width 64: 1; text width 128: 2)"), message


def test_published_widths_take_their_models_head_counts_without_a_warning():
    # open_clip's ViT-H/14 has 16 vision heads of 80 channels: width // 64 would say 20.
    clip = CLIPConfig(embed_dim=32, vision=VisionConfig(width=1280, layers=1, heads=16, patch_size=32, image_size=64),
                      text=TextConfig(width=512, layers=1, heads=8, vocab_size=16))
    shapes = {name: torch.empty(tensor.shape) for name, tensor in TempMe(
        ModelConfig(clip=clip, merge=default_merge_config(clip, 4, "none"), frames=4)).state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inferred = infer_clip_config(shapes)
    assert (inferred.vision.heads, inferred.text.heads) == (16, 8)


def test_other_architectures_are_named(backbone, tmp_path):
    resnet = {"visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "visual.attnpool.positional_embedding":
              torch.zeros(50, 2048), **{k: v for k, v in backbone.items() if not k.startswith("visual.")}}
    torch.save(resnet, tmp_path / "rn50.pt")
    with pytest.raises(WeightsError, match=r"rn50.pt: a ResNet CLIP .*tempme's video encoder is a ViT"):
        load_weights(tmp_path / "rn50.pt")
    # A wider MLP than 4 x width (open_clip's ViT-g/14): the model built from the shapes cannot take it.
    wide = dict(backbone)
    for name in [name for name in wide if "mlp.c_fc" in name or "mlp.c_proj.weight" in name]:
        shape = list(wide[name].shape)
        shape[0 if "c_fc" in name else 1] = 5 * WIDTH
        wide[name] = torch.zeros(shape)
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(WeightsError, match=rf"wide.pt: visual.transformer.resblocks.0.mlp is {5 * WIDTH} wide, not 4 "
                                           rf"times the width {WIDTH}"):
        tempme.load_model(tmp_path / "wide.pt", method="none", frames=4)


def test_a_text_only_hf_config_is_named_as_such(files, tmp_path):
    folder = tmp_path / "text-only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((files["hf_dir"] / "model.safetensors").read_bytes())
    (folder / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModelWithProjection"], "hidden_size": 64}))
    with pytest.raises(WeightsError, match=r"config.json describes no CLIPModel \(CLIPTextModelWithProjection\): it "
                                           "has no vision_config and text_config"):
        load_weights(folder)


def test_a_training_run_given_as_weights_points_at_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    with pytest.raises(WeightsError, match=r"run is a run folder of `tempme train`.*--checkpoint"):
        load_weights(run)


def test_infer_frames_reads_the_first_clipme_layer():
    sd = build_model(frames=8, method="tempme").state_dict()  # clips 8 -> 4 -> 2: (2, 2, 2)
    assert infer_frames(sd) == 8


# --- damaged files --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["random.pt", "random.safetensors", "random.bin", "random"])
def test_random_bytes_raise_weights_error(tmp_path, name):
    path = tmp_path / name
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path.write_bytes(noise.numpy().tobytes())
    with pytest.raises(WeightsError, match=name):
        read_checkpoint(path)


@pytest.mark.parametrize("kind", ["openai_jit", "openai_pt", "openai_pt_legacy", "hf_file", "ours_full"])
def test_truncated_files_raise_weights_error(files, tmp_path, kind):
    data = files[kind].read_bytes()
    path = tmp_path / ("cut-" + files[kind].name)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=path.name):
        load_weights(path)


def test_hf_weights_with_another_activation_are_refused(files, tmp_path):
    folder = tmp_path / "hf-gelu"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((files["hf_dir"] / "model.safetensors").read_bytes())
    config = json.loads((files["hf_dir"] / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "gelu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"config.json: hidden_act \['gelu', 'quick_gelu'\]: tempme's encoders use QuickGELU"):
        load_weights(folder)


def test_truncated_hf_dir_names_the_file(files, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    data = (files["hf_dir"] / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_weights(folder)


def test_shards_are_read_beside_their_index_only(files, tmp_path):
    folder = tmp_path / "hf-sharded"
    folder.mkdir()
    (tmp_path / "elsewhere.safetensors").write_bytes((files["hf_dir"] / "model.safetensors").read_bytes())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(WeightsError, match=r"lists shard '../elsewhere.safetensors', which is not a file name in"):
        load_weights(folder)


def test_zip_with_damaged_pickle(files, tmp_path):
    """A readable zip whose pickled index is garbage: torch's own error must not leak out."""
    data = bytearray(files["openai_pt"].read_bytes())
    with zipfile.ZipFile(files["openai_pt"]) as archive:
        offset = next(info.header_offset for info in archive.infolist() if info.filename.endswith("data.pkl"))
    # Skip the local file header (30 bytes + name + extra field) to reach the member's bytes.
    name_length = int.from_bytes(data[offset + 26 : offset + 28], "little")
    extra_length = int.from_bytes(data[offset + 28 : offset + 30], "little")
    start = offset + 30 + name_length + extra_length
    data[start : start + 16] = b"\xff" * 16
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="damaged.pt"):
        read_checkpoint(path)


class Pickled:
    """Not a tensor: loading it needs torch.load(weights_only=False)."""


def test_pickled_objects_need_unsafe_loading(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "args": Pickled()}, path)
    with pytest.raises(WeightsError, match="object.pt.*weights_only=False"):
        read_checkpoint(path)


def test_empty_and_tensorless_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty.pt"):
        read_checkpoint(tmp_path / "empty.pt")
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(WeightsError, match="meta.pt.*no tensors"):
        read_checkpoint(tmp_path / "meta.pt")
    with pytest.raises(WeightsError, match="no weights"):
        read_checkpoint(tmp_path)


# --- loading errors -------------------------------------------------------------------------------


def test_missing_backbone_key(full):
    sd = dict(full)
    del sd["visual.ln_post.weight"]
    with pytest.raises(WeightsError, match=r"1 missing backbone key: visual\.ln_post\.weight"):
        load_state_dict_into(build_model(seed=3), sd)


def test_unexpected_key(full):
    with pytest.raises(WeightsError, match=r"unexpected key.*visual\.extra_head"):
        load_state_dict_into(build_model(seed=3), {**full, "visual.extra_head": torch.zeros(3)})


def test_lora_into_model_without_lora_is_unexpected(full):
    clip = get_preset(PRESET)
    config = ModelConfig(clip=clip, merge=default_merge_config(clip, FRAMES), frames=FRAMES, lora=LoRAConfig(rank=0))
    with pytest.raises(WeightsError, match="lora_a.*lora rank 0"):
        load_state_dict_into(TempMe(config), full)


def test_clip_pos_embed_for_other_frame_count(full):
    other = build_model(frames=3, seed=3)  # clip positional embeddings of 3 clips, not 12
    with pytest.raises(WeightsError) as info:
        load_state_dict_into(other, full)
    message = str(info.value)
    assert "visual.transformer.resblocks.8.clip_pos_embed" in message
    assert "[1, 12, 1, 64]" in message and "[1, 3, 1, 64]" in message and "frame count" in message


def test_strict_adapters(backbone):
    fresh = build_model(seed=4)
    with pytest.raises(WeightsError, match="missing adapter key"):
        load_state_dict_into(fresh, backbone, strict_adapters=True)
    with torch.no_grad():
        for name, param in fresh.named_parameters():
            if name.endswith("lora_b"):
                param.zero_()  # the model's own init; plain CLIP weights leave it there
    load_state_dict_into(fresh, backbone)
    assert all(not p.any() for n, p in fresh.named_parameters() if n.endswith("lora_b"))


def test_load_weights_of_a_non_clip_file(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="other.safetensors.*visual.conv1.weight"):
        load_weights(tmp_path / "other.safetensors")


# --- resolving names ------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("TEMPME_CACHE", str(folder))
    monkeypatch.delenv("TEMPME_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return folder


def test_offline_uncached_preset(cache, monkeypatch):
    monkeypatch.setenv("TEMPME_OFFLINE", "1")
    with pytest.raises(WeightsError) as info:
        resolve_weights("ViT-B/32")
    assert str(cache / "ViT-B-32.pt") in str(info.value)
    assert "openai/clip-vit-base-patch32" in str(info.value)


def test_hf_offline_variable_also_blocks_downloads(cache, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", pytest.fail)
    with pytest.raises(WeightsError, match="ViT-B-16"):
        resolve_weights("ViT-B/16")


def test_preset_without_published_weights(cache):
    with pytest.raises(WeightsError, match="tiny-B-32.pt"):
        resolve_weights(PRESET)


def test_unknown_name(cache):
    with pytest.raises(WeightsError) as info:
        resolve_weights("ViT-Q/99")
    assert "does not exist" in str(info.value) and "ViT-B/32" in str(info.value) and PRESET in str(info.value)


def test_cached_file_is_used(cache, monkeypatch, files):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", pytest.fail)
    cache.mkdir()
    target = cache / "tiny-B-32.pt"
    target.write_bytes(files["openai_jit"].read_bytes())
    assert resolve_weights(PRESET) == target
    assert load_weights(PRESET).source_format == "openai-jit"
    assert resolve_weights(str(files["hf_dir"])) == files["hf_dir"]


def test_download_goes_through_hf_hub(cache, monkeypatch, files):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, cache_dir=None, **kwargs):
        calls.append((repo_id, filename, cache_dir))
        return str(files["hf_dir"] / "model.safetensors")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr("socket.getaddrinfo", lambda host, port: [("a resolved", host, port)])  # online
    assert resolve_weights("ViT-B/32") == files["hf_dir"] / "model.safetensors"
    assert calls == [("openai/clip-vit-base-patch32", "model.safetensors", str(cache))]


def test_failed_download_says_where_to_put_the_file(cache, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr("socket.getaddrinfo", lambda host, port: [("a resolved", host, port)])
    with pytest.raises(WeightsError) as info:
        resolve_weights("ViT-L/14")
    message = str(info.value)
    assert "network unreachable" in message and str(cache / "ViT-L-14.pt") in message
    assert "openai/clip-vit-large-patch14" in message


def test_a_checkpoint_brings_its_method_and_keeps_its_schedule_where_one_setting_changes(tmp_path):
    torch.manual_seed(0)
    saved = tempme.create_model(PRESET, method="tome", frames=FRAMES, tome_r=3, prop_attn=False)
    path = save_weights(saved, tmp_path / "tome.safetensors")
    assert tempme.load_model(path).config == saved.config  # its method, not tempme's
    changed = tempme.load_model(path, prop_attn=True).config.merge
    assert (changed.method, changed.tome_r, changed.prop_attn) == ("tome", 3, True)  # tome_r stays 3
    # Another method starts from the paper's schedule for it.
    other = tempme.load_model(path, method="tempme").config.merge
    assert other == default_merge_config(get_preset(PRESET), FRAMES, "tempme")


def test_a_tempme_checkpoint_loads_for_another_method_or_frame_count(tmp_path):
    torch.manual_seed(0)
    trained = tempme.create_model(PRESET, method="tempme", frames=FRAMES)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if is_adapter_parameter(name):
                param.normal_()  # trained LoRA and clip positional embeddings, not their zero start
    path = save_weights(trained, tmp_path / "tempme.safetensors")
    lora = {name: t for name, t in trained.state_dict().items() if "lora_" in name}
    assert any("clip_pos_embed" in name for name in trained.state_dict())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = tempme.load_model(path)  # its own schedule: everything fits, no warning
    assert all(torch.equal(t, trained.state_dict()[name]) for name, t in same.state_dict().items())
    for options, shown in ((dict(method="none"), f"method 'none', {FRAMES} frames"),
                           (dict(method="tome"), f"method 'tome', {FRAMES} frames"),
                           (dict(frames=2 * FRAMES), f"method 'tempme', {2 * FRAMES} frames, merge layers")):
        with pytest.warns(UserWarning, match=rf"tempme.safetensors: its clip positional embeddings of layer\(s\) "
                          rf"8, 9, 10 \(trained for {FRAMES} frames\) do not fit this model \({shown}"):
            other = tempme.load_model(path, **options)
        state = other.state_dict()
        assert all(torch.equal(state[name], t) for name, t in lora.items())  # the LoRA weights are loaded
        embeddings = [t for name, t in state.items() if "clip_pos_embed" in name]
        assert len(embeddings) == (3 if other.config.merge.method == "tempme" else 0)
        assert all(not t.any() for t in embeddings)  # none fits 24 frames: all start at zero
    # Joining 3 clips first, then 2 and 2: layer 8 still sees 12 clips and keeps its trained embedding.
    with pytest.warns(UserWarning, match=r"clip positional embeddings of layer\(s\) 9, 10 \(trained for"):
        partly = tempme.load_model(path, clips_joined=(3, 2, 2)).state_dict()
    layer = "visual.transformer.resblocks.{}.clip_pos_embed"
    assert torch.equal(partly[layer.format(8)], trained.state_dict()[layer.format(8)])
    assert not partly[layer.format(9)].any() and not partly[layer.format(10)].any()


def test_a_model_optimised_for_inference_is_not_saved_as_a_checkpoint(tmp_path):
    model = tempme.create_model(PRESET, frames=FRAMES).optimize_for_inference()
    with pytest.raises(WeightsError, match="optimised for inference"):
        save_weights(model, tmp_path / "folded.safetensors")
    assert not (tmp_path / "folded.safetensors").exists()
    folded_lora = tempme.create_model(PRESET, frames=FRAMES).fold_lora()  # weights stay loadable
    assert save_weights(folded_lora, tmp_path / "lora-folded.safetensors").is_file()


def test_a_hub_that_does_not_resolve_fails_at_once(cache, monkeypatch):
    """huggingface_hub would retry for half a minute: a host name that does not resolve ends it at once,
    and a proxy, which resolves names itself, is left to try."""
    import socket

    import huggingface_hub

    def unresolvable(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr("socket.getaddrinfo", unresolvable)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", pytest.fail)
    for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(WeightsError) as info:
        resolve_weights("ViT-B/32")
    message = str(info.value)
    assert "cannot resolve huggingface.co: Name or service not known" in message
    assert str(cache / "ViT-B-32.pt") in message

    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org")
    with pytest.raises(WeightsError, match="cannot resolve hub.example.org"):
        resolve_weights("ViT-B/32")

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    downloads = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kwargs: downloads.append(kwargs) or "x")
    resolve_weights("ViT-B/32")
    assert len(downloads) == 1
