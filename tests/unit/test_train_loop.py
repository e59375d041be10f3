"""The training loop on a tiny model and an in-memory dataset (no video decoding).

(a) training lowers the loss; (b) an interrupted and resumed run ends with exactly the parameters
of an uninterrupted one; (c) two processes compute the same gradients as one process on the same
global batch; plus the sampler, the loss, checkpoints and evaluation caching.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
import torch.multiprocessing as mp
from torch.utils.data import Dataset

import tempme
from tempme.config import CLIPConfig, TextConfig, VisionConfig, default_merge_config, get_preset
from tempme.data import SkippedVideo, collate_skip_bad
from tempme_train.checkpoint import LAST, find_checkpoint
from tempme_train.config import ConfigError, TrainConfig, apply_overrides, config_from_dict, load_config
from tempme_train.data import EpochSampler, TrainData
from tempme_train.evaluate import EvalSet, embed, evaluate
from tempme.retrieval import contrastive_loss
from tempme_train.modeling import build_model, load_trained_weights, trainable_parameters
from tempme_train.train import compute_gradients, train

FRAMES, SIZE, WORDS = 4, 32, 16


pytestmark = pytest.mark.usefixtures("one_thread")


PRESET = "test-tiny-32px"
# A 4-layer, 32-pixel model: 2x2 patches per frame, so a step takes milliseconds.
tempme.register_preset(
    PRESET,
    CLIPConfig(
        embed_dim=16,
        vision=VisionConfig(width=32, layers=4, heads=2, patch_size=16, image_size=SIZE),
        text=TextConfig(width=32, layers=1, heads=2),
    ),
)
ANIMALS = ["cat", "dog", "horse", "bird", "fish", "cow", "goat", "fox"]
COLOURS = ["red", "blue", "green", "white", "black", "yellow"]


def caption(i: int) -> str:
    return f"a {COLOURS[i % len(COLOURS)]} {ANIMALS[i % len(ANIMALS)]} number {i}"


class SyntheticPairs(Dataset):
    """``n`` (video, caption) pairs shaped like ``tempme.data.RetrievalPairs`` samples; video ``bad`` is undecodable."""

    def __init__(self, n: int, bad: int | None = None):
        generator = torch.Generator().manual_seed(0)
        self.videos = torch.randn(n, FRAMES, 3, SIZE, SIZE, generator=generator)
        self.captions = [caption(i) for i in range(n)]
        self.ids, self.mask = tempme.tokenize(self.captions, WORDS)
        self.bad = bad

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int):
        if i == self.bad:
            return SkippedVideo(f"v{i}", Path(f"v{i}.mp4"), "corrupt")
        return {"video": self.videos[i], "video_mask": torch.ones(FRAMES, dtype=torch.long),
                "text_ids": self.ids[i], "text_mask": self.mask[i], "index": i, "video_id": f"v{i}"}


class SyntheticVideos(Dataset):
    """The videos of a :class:`SyntheticPairs`, shaped like ``tempme.data.RetrievalVideos`` samples."""

    def __init__(self, pairs: SyntheticPairs):
        self.pairs = pairs
        self.reads = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        self.reads += 1
        return {"video": self.pairs.videos[i], "video_mask": torch.ones(FRAMES, dtype=torch.long), "index": i}


def synthetic_data(n: int = 16, bad: int | None = None) -> TrainData:
    pairs = SyntheticPairs(n, bad)
    val = EvalSet("synthetic/val", SyntheticVideos(pairs), [f"v{i}" for i in range(n)], pairs.captions, list(range(n)))
    return TrainData(pairs, val)


def tiny_config(output_dir: Path, **sections) -> TrainConfig:
    data = {
        "model": {"preset": PRESET, "weights": None, "frames": FRAMES},
        "data": {"max_frames": FRAMES, "image_size": SIZE, "max_words": WORDS, "num_workers": 0},
        "optim": {"lr": 1e-2, "batch_size": 8, "epochs": 3},
        "run": {"output_dir": str(output_dir), "eval_every": 0, "log_every": 1, "progress": False},
    }
    for section, values in sections.items():
        data[section].update(values)
    return config_from_dict(data, "test config")


def trained_state(output_dir: Path, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The trainable parameters stored in the run's last checkpoint."""
    model = build_model(config)
    load_trained_weights(model, output_dir / LAST / "weights.safetensors")
    return {name: param.detach().clone() for name, param in trainable_parameters(model).items()}


# --- (a) training lowers the loss --------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_outputs(tmp_path):
    config = tiny_config(tmp_path, optim={"epochs": 8, "warmup": 0.0, "lr": 3e-2})
    summary = train(config, data=synthetic_data())
    losses = summary.losses
    assert summary.steps == summary.total_steps == 16 and not summary.stopped_early
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert {"config.yaml", "metrics.jsonl", "best.safetensors", "last"} <= set(os.listdir(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = [record["kind"] for record in records]
    assert kinds.count("train") == 16 and kinds.count("val") == 8 and kinds[-1] == "summary"
    assert records[0]["lr"] == pytest.approx(3e-2) and records[0]["loss"] == pytest.approx(losses[0])
    val_r1 = [record["t2v"]["R1"] for record in records if record["kind"] == "val"]
    assert summary.best_val_r1 == max(val_r1)


def test_validation_results_are_printed_without_the_progress_bar(tmp_path, capsys):
    train(tiny_config(tmp_path, optim={"epochs": 1}), data=synthetic_data())  # run.progress is false
    printed = capsys.readouterr().err
    assert "validation at step 2/2: text-to-video R@1 " in printed and "it/s" not in printed


def test_only_adapters_train_and_the_frozen_weights_stay(tmp_path):
    config = tiny_config(tmp_path, optim={"epochs": 1})
    before = build_model(config).state_dict()
    train(config, data=synthetic_data())
    after = build_model(config)
    load_trained_weights(after, tmp_path / "best.safetensors")
    for name, tensor in after.state_dict().items():
        changed = not torch.equal(tensor, before[name])
        assert changed == ("lora_b" in name or "lora_a" in name or "clip_pos_embed" in name), name


def test_full_finetuning_trains_and_saves_every_weight_but_the_logit_scale(tmp_path):
    config = tiny_config(tmp_path, model={"trainable": "full"}, optim={"epochs": 1})
    before = build_model(config).state_dict()
    train(config, data=synthetic_data())
    after = build_model(config)
    load_trained_weights(after, tmp_path / "best.safetensors")
    unchanged = [name for name, tensor in after.state_dict().items() if torch.equal(tensor, before[name])]
    assert "logit_scale" in unchanged and "visual.conv1.weight" not in unchanged


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, precision):
    summary = train(tiny_config(tmp_path, optim={"epochs": 1, "precision": precision}), data=synthetic_data())
    assert summary.steps == 2 and all(math.isfinite(loss) for loss in summary.losses)
    assert summary.best_val_r1 is not None


def test_the_gradient_divisor_acts_as_the_papers_four_gpu_average(tmp_path):
    """Dividing the gradient by 4 before clipping at 1 with Adam eps 1e-6 (the paper's run, whose DDP
    averaged over 4 GPUs) is clipping the whole gradient at 4 with eps 4e-6, which differs from
    clipping it at 1: the clip acts here (lr 0.1 on the tiny model)."""
    data = synthetic_data()
    runs = {
        "divided": {"gradient_divisor": 4.0, "grad_clip": 1.0, "eps": 1e-6},
        "scaled": {"gradient_divisor": 1.0, "grad_clip": 4.0, "eps": 4e-6},
        "whole": {"gradient_divisor": 1.0, "grad_clip": 1.0, "eps": 1e-6},
    }
    states = {}
    for name, optim in runs.items():
        config = tiny_config(tmp_path / name, optim={"epochs": 2, "warmup": 0.0, "lr": 0.1, **optim})
        train(config, data=data)
        states[name] = trained_state(tmp_path / name, config)
    for name in states["divided"]:
        torch.testing.assert_close(states["divided"][name], states["scaled"][name], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(states["divided"][name], states["whole"][name], rtol=1e-3, atol=1e-5)
               for name in states["divided"])


# --- (b) resume --------------------------------------------------------------------------------


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    data = synthetic_data(24)
    # deterministic: on a GPU, atomic additions in merging would otherwise differ in the last bits.
    full = tiny_config(tmp_path / "full", run={"eval_every": 2, "deterministic": True})
    train(full, data=data)

    parts = tiny_config(tmp_path / "parts", run={"eval_every": 2, "stop_after": 4, "deterministic": True})
    first = train(parts, data=data)
    assert first.stopped_early and first.steps == 4
    # A mid-epoch stop: 3 steps per epoch, so step 4 is the first batch of the second epoch.
    parts = tiny_config(tmp_path / "parts", run={"eval_every": 2, "deterministic": True})
    second = train(parts, resume=True, data=data)
    assert second.steps == 9 and not second.stopped_early and len(second.losses) == 5

    expected, got = trained_state(tmp_path / "full", full), trained_state(tmp_path / "parts", parts)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_resume_refuses_other_settings_and_fresh_runs_refuse_old_folders(tmp_path):
    data = synthetic_data()
    train(tiny_config(tmp_path, run={"stop_after": 1}), data=data)
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config(tmp_path), data=data)
    with pytest.raises(ConfigError, match="optim.lr"):
        train(tiny_config(tmp_path, optim={"lr": 1e-3}), resume=True, data=data)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_config(tmp_path / "elsewhere"), resume=True, data=data)
    assert find_checkpoint(tmp_path) == tmp_path / LAST


def test_a_checkpoint_older_than_a_setting_resumes_with_the_value_its_run_had(tmp_path):
    data = synthetic_data()
    train(tiny_config(tmp_path, run={"stop_after": 1}), data=data)
    stored = tmp_path / LAST / "config.yaml"
    lines = stored.read_text().splitlines(keepends=True)
    assert any("gradient_divisor" in line for line in lines)
    stored.write_text("".join(line for line in lines if "gradient_divisor" not in line))  # as written before it existed
    message = ("was trained with optim.gradient_divisor=1.0, as every run was before optim.gradient_divisor "
               "existed: the run goes on with it")
    with pytest.warns(UserWarning, match=message):
        summary = train(tiny_config(tmp_path, run={"stop_after": 2}), resume=True, data=data)
    assert summary.steps == 2
    assert load_config(tmp_path / LAST / "config.yaml").optim.gradient_divisor == 1.0  # recorded from now on
    # The same command resumes it again (multi-day runs stop more than once) ...
    with pytest.warns(UserWarning, match=message):
        assert train(tiny_config(tmp_path, run={"stop_after": 3}), resume=True, data=data).steps == 3
    # ... and a value asked for on the command line, the default included, is a change, refused.
    for asked in (["optim.gradient_divisor=2"], ["optim.gradient_divisor=4"]):
        with pytest.raises(ConfigError, match=r"optim.gradient_divisor.*checkpoint's value 1.0"):
            train(apply_overrides(tiny_config(tmp_path), asked), resume=True, data=data)


def test_a_resume_never_takes_over_a_value_its_run_chose(tmp_path):
    data = synthetic_data()
    train(tiny_config(tmp_path, optim={"gradient_divisor": 2.0}, run={"stop_after": 1}), data=data)
    with pytest.raises(ConfigError, match=r"optim.gradient_divisor.*checkpoint's value 2.0"):
        train(tiny_config(tmp_path), resume=True, data=data)  # the default, 4: a change


def test_a_resume_compares_the_schedule_its_model_uses_not_how_it_was_given(tmp_path):
    data = synthetic_data()
    train(tiny_config(tmp_path, run={"stop_after": 1}), data=data)  # the paper's schedule, none of it given
    paper = default_merge_config(get_preset(PRESET), FRAMES, "tempme")

    def model(**schedule) -> dict:
        return {"preset": PRESET, "weights": None, "frames": FRAMES, "schedule": schedule}

    # Given as the value the run uses already: the same model.
    given = tiny_config(tmp_path, model=model(tome_r=paper.tome_r), run={"stop_after": 2})
    assert train(given, resume=True, data=data).steps == 2
    assert train(tiny_config(tmp_path, run={"stop_after": 3}), resume=True, data=data).steps == 3  # and left out again
    # Another value is refused, by its key and both values in full.
    with pytest.raises(ConfigError) as caught:
        train(tiny_config(tmp_path, model=model(tome_r=paper.tome_r, cross_merge_ratio=0.25)), resume=True, data=data)
    assert str(caught.value) == (
        f"test config: model.schedule.cross_merge_ratio: differs from the checkpoint's value {paper.cross_merge_ratio}; "
        f"a resumed run must keep model.schedule.cross_merge_ratio as in {tmp_path / LAST / 'config.yaml'} (got 0.25)")


def test_a_resume_refuses_to_switch_a_frame_cache_on_or_off_where_frames_are_augmented(tmp_path):
    data, cache, moved = synthetic_data(), str(tmp_path / "frames"), str(tmp_path / "moved")

    def run(folder: str, stop_after: int, resume: bool = False, **settings):
        config = tiny_config(tmp_path / folder, data=settings, run={"stop_after": stop_after})
        return train(config, resume=resume, data=data)

    run("augmented", 1)
    with pytest.raises(ConfigError, match=r"data.frame_cache: differs from the checkpoint's value None; .*config.yaml "
                                          r"\(RandAugment then works on other frames, the cached ones already resized"):
        run("augmented", 2, resume=True, frame_cache=cache)
    run("cached", 1, frame_cache=cache)
    with pytest.raises(ConfigError, match=f"data.frame_cache: differs from the checkpoint's value '{cache}'"):
        run("cached", 2, resume=True)
    assert run("cached", 2, resume=True, frame_cache=moved).steps == 2  # the cache moved: the same frames
    # Unaugmented, cached frames give the tensors decoding gives: the switch changes no step.
    run("plain", 1, augment=False)
    assert run("plain", 2, resume=True, augment=False, frame_cache=cache).steps == 2


def test_a_save_stopped_between_its_renames_never_leaves_the_run_without_a_checkpoint(tmp_path, monkeypatch):
    from tempme_train import checkpoint

    def write(step):
        return lambda folder: (folder / checkpoint.STATE).write_text(str(step))

    last = tmp_path / LAST
    checkpoint.write_directory_atomically(last, write(1))
    checkpoint.write_directory_atomically(last, write(2))
    os.replace(last, tmp_path / f".{LAST}.old")  # a save stopped after moving last/ away
    assert (find_checkpoint(tmp_path) / checkpoint.STATE).read_text() == "2"

    replace = os.replace

    def stop_before_the_new_copy_lands(source, destination):
        if Path(destination) == last and Path(source).name != f".{LAST}.old":
            raise KeyboardInterrupt  # the next save stops between its two renames too
        replace(source, destination)

    monkeypatch.setattr(checkpoint.os, "replace", stop_before_the_new_copy_lands)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_directory_atomically(last, write(3))
    assert (find_checkpoint(tmp_path) / checkpoint.STATE).read_text() == "2"
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    checkpoint.write_directory_atomically(last, write(4))
    assert find_checkpoint(tmp_path) == last and (last / checkpoint.STATE).read_text() == "4"
    assert not (tmp_path / f".{LAST}.old").exists()


def test_weights_of_another_backbone_than_the_preset_are_refused_naming_the_right_one(tmp_path):
    from tempme.weights import save_weights

    name = "test-tiny-48-wide"  # a layout no other test registers
    tempme.register_preset(name, CLIPConfig(
        embed_dim=16, vision=VisionConfig(width=48, layers=4, heads=2, patch_size=16, image_size=SIZE),
        text=TextConfig(width=32, layers=1, heads=2),
    ))
    weights = tmp_path / "clip.safetensors"
    save_weights(tempme.create_model(name, method="none"), weights)
    wrong = tiny_config(tmp_path / "wrong", model={"weights": str(weights)})  # model.preset is PRESET
    with pytest.raises(ConfigError, match=f"model.preset.*hold {name}, not {PRESET}: set model.preset={name}"):
        train(wrong, data=synthetic_data())
    assert not (tmp_path / "wrong" / "last").exists()
    right = tiny_config(tmp_path / "right", model={"preset": name, "weights": str(weights)}, run={"stop_after": 1})
    assert train(right, data=synthetic_data()).steps == 1
    # Weights of a layout no preset has train as they are, with a warning; an unknown preset is refused.
    odd = tmp_path / "odd.safetensors"
    save_weights(tempme.create_model(CLIPConfig(
        embed_dim=16, vision=VisionConfig(width=40, layers=4, heads=2, patch_size=16, image_size=SIZE),
        text=TextConfig(width=32, layers=1, heads=2)), method="none"), odd)
    with pytest.warns(UserWarning, match=f"model.preset={PRESET} does not describe model.weights .*width 40"):
        assert train(tiny_config(tmp_path / "odd", model={"weights": str(odd)}, run={"stop_after": 1}),
                     data=synthetic_data()).steps == 1
    with pytest.raises(ConfigError, match="model.preset: unknown model preset 'ViT-B32'"):
        train(tiny_config(tmp_path / "typo", model={"preset": "ViT-B32", "weights": str(weights)}), data=synthetic_data())


def test_a_fresh_run_refuses_a_folder_with_trained_weights_and_no_checkpoint(tmp_path):
    """With last/ removed (to save space, say) the weights are still there: a new run would overwrite
    them. Config and metrics alone (a run stopped before its first checkpoint) are started over."""
    import shutil

    data = synthetic_data()
    train(tiny_config(tmp_path, optim={"epochs": 1}), data=data)
    shutil.rmtree(tmp_path / LAST)
    trained = sorted(path.name for path in tmp_path.glob("*.safetensors"))
    assert trained
    with pytest.raises(ValueError, match=f"holds the trained weights of another run \\({', '.join(trained)}\\)"):
        train(tiny_config(tmp_path, optim={"epochs": 1}), data=data)
    for name in trained:
        (tmp_path / name).unlink()
    assert train(tiny_config(tmp_path, optim={"epochs": 1}), data=data).steps > 0


def test_undecodable_videos_are_skipped_and_reported(tmp_path):
    summary = train(tiny_config(tmp_path, optim={"epochs": 1}), data=synthetic_data(bad=3))
    assert summary.skipped_videos == ["v3"] and summary.steps == 2


def test_an_undecodable_video_is_warned_about_once_in_a_run(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as in loader workers, which remember no earlier warning
        summary = train(tiny_config(tmp_path, optim={"epochs": 3}), data=synthetic_data(bad=3))
    assert summary.skipped_videos == ["v3"] and summary.steps == 6
    told = [str(warning.message) for warning in caught if "skipping video" in str(warning.message)]
    assert told == ["skipping video 'v3' for the rest of the run: cannot decode v3.mp4: corrupt"]


# --- (c) distributed --------------------------------------------------------------------------


def global_batch() -> list[dict]:
    pairs = SyntheticPairs(8)
    return [pairs[i] for i in range(8)]


def gradients(world_size: int, rank: int) -> dict:
    """This process's share of an 8-pair global batch, through ``compute_gradients``."""
    model = build_model(tiny_config(Path("unused")))
    params = trainable_parameters(model)
    share = len(global_batch()) // world_size
    local = collate_skip_bad(global_batch()[rank * share : (rank + 1) * share])
    loss = compute_gradients(model, local, list(params.values()), torch.device("cpu"))
    return {"loss": loss, "grads": {name: p.grad for name, p in params.items()}}


def evaluations(cache: Path) -> dict:
    """Embeddings and metrics of 7 videos (an odd count: the shares differ), then the same from the cache."""
    model = build_model(tiny_config(Path("unused")))
    pairs = SyntheticPairs(7)
    videos = SyntheticVideos(pairs)
    eval_set = EvalSet("synthetic/odd", videos, [f"v{i}" for i in range(7)], pairs.captions, list(range(7)))
    embeddings = embed(model, eval_set, batch_size=2)
    read = videos.reads
    first = evaluate(model, eval_set, batch_size=2, cache_dir=cache)
    reads = videos.reads
    again = evaluate(model, eval_set, batch_size=2, cache_dir=cache)
    return {"text": embeddings.text, "video": embeddings.video, "present": embeddings.present,
            "first": first, "again": again, "read": read, "read_again": videos.reads - reads}


def distributed_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """One of two processes: save the gradients of one global batch, then run a whole training."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    result = gradients(world_size, rank)
    if rank == 0:
        # The main process writes the shared embedding cache slowly: the other must wait for it rather
        # than look for the file too soon and embed everything again.
        evaluate_module = importlib.import_module("tempme_train.evaluate")  # the package's `evaluate` is the function
        save_cached = evaluate_module.save_cached
        evaluate_module.save_cached = lambda *args: time.sleep(1.0) or save_cached(*args)
    result["evaluations"] = evaluations(Path(folder) / "cache")
    torch.save(result, Path(folder) / f"gradients{rank}.pt")
    summary = train(tiny_config(Path(folder) / "run", run={"eval_every": 2, "device": "cpu"}), data=synthetic_data())
    torch.save(summary.last_val, Path(folder) / f"validation{rank}.pt")
    # The first steps of a run that one process then resumes.
    train(tiny_config(Path(folder) / "half", run={"eval_every": 2, "device": "cpu", "stop_after": 2}), data=synthetic_data())
    torch.distributed.destroy_process_group()
    # The group's threads must end here, not during interpreter shutdown (where they can abort it).
    threads = [(Path("/proc/self/task") / task / "comm").read_text().strip() for task in os.listdir("/proc/self/task")]
    (Path(folder) / f"threads{rank}.json").write_text(json.dumps(threads))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_give_the_gradients_and_training_of_one_process(tmp_path):
    # Both checks share one pair of processes: starting them costs more than the checks.
    mp.spawn(distributed_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)

    one, two = gradients(1, 0), torch.load(tmp_path / "gradients0.pt")
    # Each process embedded its share of the captions and videos; both end with all of them.
    alone = evaluations(tmp_path / "single-cache")
    for rank in (0, 1):
        shared = torch.load(tmp_path / f"gradients{rank}.pt")["evaluations"]
        for key in ("text", "video"):
            assert shared[key].shape == alone[key].shape and torch.allclose(shared[key], alone[key], atol=1e-5), key
        assert shared["present"].tolist() == [True] * 7
        assert shared["read"] == [4, 3][rank]  # videos 0, 2, 4, 6 and 1, 3, 5
        assert shared["first"]["t2v"] == alone["first"]["t2v"] and shared["first"]["v2t"] == alone["first"]["v2t"]
        assert shared["again"]["cache"] == shared["first"]["cache"] and shared["read_again"] == 0
        assert shared["again"]["t2v"] == shared["first"]["t2v"]
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)
    assert one["grads"].keys() == two["grads"].keys()
    for name, grad in one["grads"].items():
        assert grad is not None and torch.allclose(two["grads"][name], grad, atol=1e-6, rtol=1e-5), name

    config = tiny_config(tmp_path / "single", run={"eval_every": 2, "device": "cpu"})
    summary = train(config, data=synthetic_data())
    single, double = trained_state(tmp_path / "single", config), trained_state(tmp_path / "run", config)
    for name in single:
        assert torch.allclose(single[name], double[name], atol=1e-5), name
    # Resumed by one process, a run two processes started ends as one process's run does.
    half = tiny_config(tmp_path / "half", run={"eval_every": 2, "device": "cpu"})
    assert checkpoint_step(tmp_path / "half") == 2 < summary.total_steps
    train(half, resume=True, data=synthetic_data())
    resumed = trained_state(tmp_path / "half", half)
    for name in single:
        assert torch.allclose(single[name], resumed[name], atol=1e-5), name
    assert (tmp_path / "run" / "best.safetensors").is_file()
    if Path("/proc/self/task").is_dir():  # Linux
        for rank in (0, 1):
            threads = json.loads((tmp_path / f"threads{rank}.json").read_text())
            assert not [name for name in threads if "gloo" in name], threads
    # Both processes validated (each its share) and got the same metrics.
    validation = [torch.load(tmp_path / f"validation{rank}.pt") for rank in (0, 1)]
    assert validation[0]["t2v"] == validation[1]["t2v"] and validation[0]["num_videos"] == 16


class CorruptOnOneProcess(SyntheticPairs):
    """Process 1 cannot read its third batch (one of its videos is corrupt); process 0 reads all of its own."""

    reads = 0

    def __getitem__(self, i: int):
        self.reads += 1
        if torch.distributed.get_rank() == 1 and self.reads > 8:  # 4 samples a step on each of 2 processes
            raise ValueError(f"v{i}.mp4: corrupt video")
        return super().__getitem__(i)


def failing_worker(rank: int, port: int, folder: str, failure: str) -> None:
    """Train while process 1 fails as ``failure`` says; write what each process raised to ``rank<N>.txt``."""
    import importlib

    train_module = importlib.import_module("tempme_train.train")  # the package exports train() by that name
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    data = synthetic_data()
    if failure == "corrupt video":
        data.train = CorruptOnOneProcess(16)
    elif failure == "out of memory" and rank == 1:
        real_loss, calls = train_module.contrastive_loss, []

        def loss_out_of_memory_at_step_2(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("CUDA out of memory (simulated)")
            return real_loss(*args, **kwargs)

        train_module.contrastive_loss = loss_out_of_memory_at_step_2
    elif failure == "sigterm" and rank == 1:
        real_loss, calls = train_module.contrastive_loss, []

        def sigterm_during_step_2(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                signal.raise_signal(signal.SIGTERM)  # a batch scheduler's stop, reaching this process first
            return real_loss(*args, **kwargs)

        train_module.contrastive_loss = sigterm_during_step_2
    elif failure == "sigterm after the last update" and rank == 1:
        real_log = train_module.Trainer._log_train

        def sigterm_while_logging_step_3(self, step, window):
            if step == 3:
                signal.raise_signal(signal.SIGTERM)
            return real_log(self, step, window)

        train_module.Trainer._log_train = sigterm_while_logging_step_3
    elif failure == "killed" and rank == 1:
        real_loss, calls = train_module.contrastive_loss, []

        def killed_during_step_2(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os._exit(9)  # SIGKILL, the kernel's out-of-memory killer: nothing of it runs any more
            return real_loss(*args, **kwargs)

        train_module.contrastive_loss = killed_during_step_2
    elif failure == "validation video missing" and rank == 1:
        pairs = SyntheticPairs(16)
        data.val = EvalSet("synthetic/val", SyntheticVideos(pairs), [f"v{i}" for i in range(15)], pairs.captions[:15],
                           list(range(15)))
    try:
        stop_after = 3 if failure == "sigterm after the last update" else None
        train(tiny_config(Path(folder) / "run", run={"device": "cpu", "stop_after": stop_after}), data=data)
        outcome = "finished"
    except BaseException as error:  # noqa: BLE001 - the test reads it (KeyboardInterrupt included)
        outcome = f"{type(error).__name__}: {error}"
    (Path(folder) / f"rank{rank}.txt").write_text(outcome)
    torch.distributed.destroy_process_group()


def test_an_error_on_one_process_stops_all_of_them_and_rank_0_saves_the_steps_done(tmp_path):
    # Without sharing the error, process 0 would wait for process 1 in the step's gather (with
    # NCCL until the collective timeout) and, at best, fail on the lost connection, not naming it.
    mp.spawn(failing_worker, args=(free_port(), str(tmp_path), "corrupt video"), nprocs=2, join=True)

    own = (tmp_path / "rank1.txt").read_text()
    assert own.startswith("ValueError: v") and own.endswith(".mp4: corrupt video")
    told = (tmp_path / "rank0.txt").read_text()
    assert told.startswith(f"TrainingStopped: process 1 of 2 failed: {own}"), told
    assert f"saved {tmp_path / 'run' / LAST} at step 2/6" in told and "--resume" in told
    assert checkpoint_step(tmp_path / "run") == 2


def test_running_out_of_memory_in_one_process_backward_pass_stops_all_of_them(tmp_path):
    mp.spawn(failing_worker, args=(free_port(), str(tmp_path), "out of memory"), nprocs=2, join=True)

    assert (tmp_path / "rank1.txt").read_text() == "RuntimeError: CUDA out of memory (simulated)"
    told = (tmp_path / "rank0.txt").read_text()
    assert told == "FailedElsewhere: process 1 of 2 failed: RuntimeError: CUDA out of memory (simulated)"
    assert checkpoint_step(tmp_path / "run") == 1  # saved by rank 0 on the way out


def test_a_process_killed_is_one_line_on_the_others_and_rank_0_saves(tmp_path):
    # mp.spawn would stop the others as soon as one exits: here they must find out for themselves.
    context = mp.start_processes(failing_worker, args=(free_port(), str(tmp_path), "killed"), nprocs=2, join=False)
    for process in context.processes:
        process.join(timeout=120)
    assert [process.exitcode for process in context.processes] == [0, 9]
    told = (tmp_path / "rank0.txt").read_text()
    assert told.startswith("TrainingStopped: another training process stopped answering (killed, out of memory, "
                           "or its node went down): "), told
    assert "\n" not in told and told.endswith(f"(training stopped: saved {tmp_path / 'run' / LAST} at step 1/6; "
                                                "continue with --resume)"), told
    assert checkpoint_step(tmp_path / "run") == 1


def test_sigterm_reaching_one_process_stops_all_of_them_after_the_same_step(tmp_path, capfd):
    # Acted on at once, the signal would leave the others blocked in the step's collectives (with
    # NCCL, rank 0 among them, unable to save); held until the step's end, it stops them all there.
    mp.spawn(failing_worker, args=(free_port(), str(tmp_path), "sigterm"), nprocs=2, join=True)

    assert (tmp_path / "rank1.txt").read_text() == "TerminationShared: SIGTERM reached this process"
    assert (tmp_path / "rank0.txt").read_text() == "StopShared: Ctrl-C or SIGTERM reached another process"
    assert checkpoint_step(tmp_path / "run") == 2  # the step during which the signal came, completed
    assert f"training stopped (Ctrl-C or SIGTERM reached another process) after step 2/6: saved {tmp_path / 'run' / LAST}" \
        in capfd.readouterr().err


def test_a_signal_after_the_last_update_lets_every_process_finish(tmp_path):
    # Nothing is left to stop after: the others must not be left alone in the final save's collectives.
    mp.spawn(failing_worker, args=(free_port(), str(tmp_path), "sigterm after the last update"), nprocs=2, join=True)

    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["finished", "finished"]
    assert checkpoint_step(tmp_path / "run") == 3


def test_processes_with_different_validation_sets_are_refused_before_training(tmp_path):
    # Each process validates its share of the rows: a video missing on one node would shift them all.
    mp.spawn(failing_worker, args=(free_port(), str(tmp_path), "validation video missing"), nprocs=2, join=True)

    for rank in (0, 1):
        told = (tmp_path / f"rank{rank}.txt").read_text()
        assert "rank 0: 16 pairs, 16 validation videos, step 0; rank 1: 16 pairs, 15 validation videos" in told
    assert find_checkpoint(tmp_path / "run") is None


def test_sampler_shards_cover_the_single_process_batches():
    single = list(EpochSampler(20, global_batch=8, seed=3))
    shards = [list(EpochSampler(20, global_batch=8, world_size=2, rank=r, seed=3)) for r in (0, 1)]
    assert len(single) == 16  # 2 full global batches; 4 samples dropped
    for step in range(2):
        together = shards[0][step * 4 : step * 4 + 4] + shards[1][step * 4 : step * 4 + 4]
        assert together == single[step * 8 : step * 8 + 8]


def test_sampler_resumes_mid_epoch_and_reshuffles_per_epoch():
    sampler = EpochSampler(24, global_batch=8, seed=0)
    sampler.set_epoch(1)
    epoch_one = list(sampler)
    sampler.set_epoch(1, start_batch=2)
    assert list(sampler) == epoch_one[16:] and len(sampler) == 8
    sampler.set_epoch(2)
    assert [i for i, _ in sampler] != [i for i, _ in epoch_one]


# --- loss and evaluation ------------------------------------------------------------------------


def test_contrastive_loss_by_hand():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    video = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    scale = torch.tensor(math.log(10.0))
    # Normalised: logits = 10 * [[1, 1/sqrt2], [0, 1/sqrt2]].
    s = 10 / math.sqrt(2)
    rows = (-math.log(math.exp(10) / (math.exp(10) + math.exp(s))) - math.log(math.exp(s) / (1 + math.exp(s)))) / 2
    cols = (-math.log(math.exp(10) / (math.exp(10) + 1)) - math.log(math.exp(s) / (2 * math.exp(s)))) / 2
    assert contrastive_loss(text, video, scale).item() == pytest.approx((rows + cols) / 2, rel=1e-6)


def test_evaluation_is_cached_by_weights_and_data(tmp_path):
    config = tiny_config(tmp_path)
    model = build_model(config)
    data = synthetic_data(8)
    first = evaluate(model, data.val, batch_size=4, cache_dir=tmp_path / "cache", progress=False)
    assert data.val.videos.reads == 8
    again = evaluate(model, data.val, batch_size=4, cache_dir=tmp_path / "cache", progress=False)
    assert data.val.videos.reads == 8 and again["t2v"] == first["t2v"] and again["cache"] == first["cache"]
    with torch.no_grad():
        next(iter(trainable_parameters(model).values())).add_(1.0)
    changed = evaluate(model, data.val, batch_size=4, cache_dir=tmp_path / "cache", progress=False)
    assert data.val.videos.reads == 16 and changed["cache"] != first["cache"]
    assert set(first["t2v"]) >= {"R1", "R5", "R10", "R50", "MdR", "MnR", "RSum"}


def test_evaluation_handles_several_captions_and_undecodable_videos(tmp_path):
    model = build_model(tiny_config(tmp_path))
    pairs = SyntheticPairs(4)

    class SomeBad(SyntheticVideos):
        def __getitem__(self, i):
            return SkippedVideo("v2", Path("v2.mp4"), "corrupt") if i == 2 else super().__getitem__(i)

    captions = [caption(i) for i in range(8)]
    eval_set = EvalSet("two-each", SomeBad(pairs), ["v0", "v1", "v2", "v3"], captions, [0, 0, 1, 1, 2, 2, 3, 3])
    results = evaluate(model, eval_set, batch_size=2, progress=False)
    assert results["skipped"] == ["v2"] and results["num_videos"] == 3 and results["num_captions"] == 6
    assert results["t2v"]["num_queries"] == 6 and results["v2t"]["num_queries"] == 3


def test_deterministic_mode_is_switched_on_for_the_run_only():
    from tempme_train.train import deterministic_algorithms

    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


def test_compiled_training_follows_the_eager_run(tmp_path, monkeypatch):
    traced = []
    real_compile = torch.compile

    def record_graph(graph_module, example_inputs):  # a backend that runs the captured graph as it is
        traced.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(torch, "compile", lambda model, **options: real_compile(model, backend=record_graph, **options))
    data = synthetic_data()
    eager = train(tiny_config(tmp_path / "eager", optim={"epochs": 1}), data=data)
    assert not traced
    through_compile = train(tiny_config(tmp_path / "compiled", optim={"epochs": 1}, run={"compile": True}), data=data)
    assert traced, "the training forward did not go through torch.compile"
    assert through_compile.steps == eager.steps == 2
    assert through_compile.losses == pytest.approx(eager.losses, rel=1e-4)


# --- interruption, resumption and what a run refuses up front -------------------------------------


def signalling_optimizer(build_optimizer, signum: int, update: int):
    """``build_optimizer`` whose optimizer sends this process ``signum`` right after its ``update``-th
    update: after the parameters moved, before the step is counted."""
    updates = []

    def build(*args, **kwargs):
        optimizer = build_optimizer(*args, **kwargs)

        def after_update(optimizer, args, kwargs):
            updates.append(1)
            if len(updates) == update:
                # To this thread, at once. With os.kill the OS picks a thread, and once (2026-11-27)
                # the run ended without the interrupt; the cause was not pinned down.
                signal.raise_signal(signum)

        optimizer.register_step_post_hook(after_update)
        return optimizer

    return build


def checkpoint_step(output_dir: Path) -> int:
    return torch.load(output_dir / LAST / "state.pt", weights_only=False)["progress"]["step"]


def train_steps_logged(output_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["step"] for record in records if record["kind"] == "train"]


def test_ctrl_c_saves_the_last_whole_step_and_the_resumed_run_matches_an_uninterrupted_one(
    tmp_path, monkeypatch, capsys
):
    import importlib
    import signal

    train_module = importlib.import_module("tempme_train.train")  # the package exports train() by that name

    data = synthetic_data(24)  # 3 steps per epoch, 9 in all; last/ is written at each epoch end
    full = tiny_config(tmp_path / "full", run={"deterministic": True})
    train(full, data=data)

    # Ctrl-C arrives during step 5's optimizer update, after the parameters moved and before the step
    # is counted: the run must finish that update, write last/ at step 5 (not keep epoch 1's step 3)
    # and stop with KeyboardInterrupt.
    real_build = train_module.build_optimizer
    monkeypatch.setattr(train_module, "build_optimizer", signalling_optimizer(real_build, signal.SIGINT, update=5))
    parts = tiny_config(tmp_path / "parts", run={"deterministic": True})
    with pytest.raises(KeyboardInterrupt):
        train(parts, data=data)
    assert checkpoint_step(tmp_path / "parts") == 5
    message = capsys.readouterr().err
    assert "interrupted after step 5/9" in message and "--resume" in message
    monkeypatch.setattr(train_module, "build_optimizer", real_build)

    resumed = train(parts, resume=True, data=data)
    assert resumed.steps == 9 and len(resumed.losses) == 4
    assert train_steps_logged(tmp_path / "parts") == list(range(1, 10))
    expected, got = trained_state(tmp_path / "full", full), trained_state(tmp_path / "parts", parts)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_resume_drops_the_records_of_steps_after_the_checkpoint(tmp_path):
    data = synthetic_data()
    train(tiny_config(tmp_path, run={"stop_after": 1}), data=data)
    assert checkpoint_step(tmp_path) == 1
    # What a session killed after two more steps (and mid-line) leaves behind.
    with open(tmp_path / "metrics.jsonl", "a") as metrics:
        metrics.write(json.dumps({"kind": "train", "step": 2, "loss": 999.0}) + "\n")
        metrics.write(json.dumps({"kind": "train", "step": 3, "loss": 999.0}) + "\n")
        metrics.write('{"kind": "train", "st')
    train(tiny_config(tmp_path, run={"stop_after": 3}), resume=True, data=data)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is whole JSON again
    assert train_steps_logged(tmp_path) == [1, 2, 3]
    assert all(record.get("loss") != 999.0 for record in records)
    # Each session ended with a summary; the run keeps one, its last session's.
    assert [record["step"] for record in records if record["kind"] == "summary"] == [3]


def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path):
    data = synthetic_data()
    train(tiny_config(tmp_path, run={"stop_after": 1}), data=data)
    state = tmp_path / LAST / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a copy cut short
    with pytest.raises(ValueError) as info:
        train(tiny_config(tmp_path), resume=True, data=data)
    message = str(info.value)
    assert str(state) in message and "damaged" in message and "start over" in message


class _RunsCode:
    """Unpickled with the full unpickler, it creates a file (a run folder may come from someone else)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_checkpoint_is_resumed_without_running_what_it_pickles(tmp_path):
    data = synthetic_data()
    train(tiny_config(tmp_path, run={"stop_after": 1}), data=data)
    state = tmp_path / LAST / "state.pt"
    saved = torch.load(state, weights_only=False)
    ran = tmp_path / "ran"
    torch.save({**saved, "extra": _RunsCode(str(ran))}, state)
    with pytest.raises(ValueError) as info:
        train(tiny_config(tmp_path), resume=True, data=data)
    assert not ran.exists()
    message = str(info.value)
    assert f"cannot resume: {state} holds Python objects that tempme train does not save" in message, message


@pytest.mark.parametrize("change", ["progress", "scheduler"])
def test_a_checkpoint_s_values_of_other_kinds_than_tempme_writes_are_refused(tmp_path, change):
    # A tuple of tuples takes as long to hash as it has leaves; the scheduler would take any key as an
    # attribute, its methods included.
    data = synthetic_data()
    train(tiny_config(tmp_path, run={"stop_after": 1}), data=data)
    state_file = tmp_path / LAST / "state.pt"
    state = torch.load(state_file, weights_only=False)
    if change == "progress":
        state["progress"]["skipped_videos"] = [("video", ("of", "tuples"))]
    else:
        state["scheduler"]["get_lr"] = "replaced"
    torch.save(state, state_file)
    with pytest.raises(ValueError, match="its saved state does not fit this run"):
        train(tiny_config(tmp_path), resume=True, data=data)


def test_numpy_s_random_state_is_restored_from_a_checkpoint_without_numpy_reading_the_file(tmp_path):
    import numpy as np

    from tempme_train import checkpoint

    np.random.seed(123)
    np.random.rand(5)
    expected = np.random.get_state()
    torch.save({"rng": checkpoint.rng_states(), "other": np.zeros(3, dtype=object)}, tmp_path / "state.pt")
    with torch.serialization.safe_globals(checkpoint._NUMPY_STAND_INS):
        loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    np.random.seed(0)
    checkpoint.restore_rng_states(loaded["rng"])
    state = np.random.get_state()
    assert state[0] == expected[0] and np.array_equal(state[1], expected[1]) and state[2:] == expected[2:]
    with pytest.raises(ValueError, match="holds another array than NumPy's"):  # an object array stands in for the key
        checkpoint.restore_rng_states({**loaded["rng"], "numpy": ("MT19937", loaded["other"], 0, 0, 0.0)})


def test_a_metrics_file_that_is_a_link_is_refused_not_written_through(tmp_path):
    data = synthetic_data()
    run = tmp_path / "run"
    train(tiny_config(run, run={"stop_after": 1}), data=data)
    outside = tmp_path / "outside.txt"
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(ValueError, match="metrics.jsonl is a symbolic link; the files of a run folder are written"):
        train(tiny_config(run), resume=True, data=data)
    assert not outside.exists()


def test_the_early_schedule_check_takes_a_weights_file_s_own_schedule_as_building_does(tmp_path):
    from tempme.weights import save_weights
    from tempme_train.modeling import check_schedule

    weights = save_weights(tempme.create_model(PRESET, frames=FRAMES, merge_layers=(1, 2), clips_joined=(2, 2)),
                           tmp_path / "own.safetensors")
    # The file's two merge layers, not the paper's three, are what clips_joined=[4, 1] goes with.
    config = tiny_config(tmp_path, model={"weights": str(weights), "schedule": {"clips_joined": [4, 1]}})
    check_schedule(config, "run.yaml")
    assert build_model(config, "run.yaml").config.merge.clips_joined == (4, 1)
    # What no model can run is refused all the same, naming the setting.
    bad = tiny_config(tmp_path, model={"weights": str(weights), "schedule": {"intra_merge_ratio": 1.0}})
    with pytest.raises(ConfigError, match="model.schedule.intra_merge_ratio: intra_merge_ratio=1.0 is outside"):
        check_schedule(bad, "run.yaml")
    # Plain CLIP weights start from the paper's schedule, whose three merge layers [4, 1] does not fit.
    torch.save(tempme.create_model(PRESET, method="none", frames=FRAMES).state_dict(), tmp_path / "clip.pt")
    plain = tiny_config(tmp_path, model={"weights": str(tmp_path / "clip.pt"), "schedule": {"clips_joined": [4, 1]}})
    with pytest.raises(ConfigError, match=r"model.schedule.clips_joined: merge_layers \[0, 1, 2\] and clips_joined "
                                          r"\[4, 1\] must have the same length"):
        check_schedule(plain, "run.yaml")


def test_a_model_with_nothing_to_train_is_refused_naming_the_settings(tmp_path):
    with pytest.raises(ConfigError, match=r"model.lora_rank: nothing to train: no LoRA, and no clip positional "
                                          r"embeddings \(model.method=none, .*set model.lora_rank above 0"):
        train(tiny_config(tmp_path, model={"lora_rank": 0, "method": "none"}), data=synthetic_data())


def test_adapters_of_another_lora_rank_are_named_as_such(tmp_path):
    from tempme_train.modeling import check_base

    train(tiny_config(tmp_path, model={"lora_rank": 4}, run={"stop_after": 1}), data=synthetic_data())
    other_rank = build_model(tiny_config(tmp_path, model={"lora_rank": 8}))
    with pytest.raises(ValueError, match=r"holds adapters of LoRA rank 4, the model was built with model.lora_rank=8"):
        check_base(other_rank, tmp_path / LAST / "weights.safetensors", "the random tiny preset")


def test_devices_this_machine_lacks_are_refused_naming_the_setting(monkeypatch):
    from tempme_train.distributed import WorldInfo
    from tempme_train.train import run_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="run.device: CUDA is not available"):
        run_device("cuda", WorldInfo(), "my.yaml")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="1 GPU .*cuda:9 does not exist"):
        run_device("cuda:9", WorldInfo(), "my.yaml")
    assert run_device("cuda", WorldInfo()) == torch.device("cuda:0")
    assert run_device("cpu", WorldInfo()) == torch.device("cpu")


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_an_output_folder_that_cannot_be_written_fails_before_any_work(tmp_path, where):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    output = blocker if where == "file" else blocker / "run"
    # No data given and no annotations configured: the output folder must be refused first.
    with pytest.raises(ValueError, match=f"run.output_dir {output}: .*(not a folder|is a file)"):
        train(tiny_config(output))


def test_adapters_record_their_backbone_and_refuse_another(tmp_path):
    from tempme_train.modeling import check_base

    config = tiny_config(tmp_path, optim={"epochs": 1})
    train(config, data=synthetic_data())
    check_base(build_model(config), tmp_path / "best.safetensors", "the same random model")
    other = build_model(tiny_config(tmp_path, optim={"seed": 1}))  # another random backbone
    with pytest.raises(ValueError, match="trained on the random .* not on another backbone"):
        check_base(other, tmp_path / "best.safetensors", "another backbone")


def test_custom_data_validated_on_its_training_pairs_is_warned_about(tmp_path):
    from data_fixtures import build_custom

    from tempme_train.data import train_and_val_items

    annotations = build_custom(tmp_path).anno_dir / "captions.csv"
    same_file = tiny_config(tmp_path, data={"dataset": "custom", "anno_path": str(annotations)})
    with pytest.warns(UserWarning, match=f"validation reads the training pairs of {annotations}"):
        train_items, val_items = train_and_val_items(same_file.data, "test config")
    assert [item.video_id for item in val_items] == [item.video_id for item in train_items]
    held_out = tiny_config(
        tmp_path, data={"dataset": "custom", "anno_path": str(annotations), "val_split": "holdout", "holdout_videos": 1}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_items, val_items = train_and_val_items(held_out.data, "test config")
    assert len(train_items) == len(val_items) == 1


def test_a_log_file_gets_no_cursor_codes_or_worker_warnings(tmp_path, capsys):
    from tempme.workers import available_cpus

    # Validation inside training (eval_every) would nest bars; more workers than CPUs make torch warn.
    config = tiny_config(
        tmp_path, optim={"epochs": 1}, run={"progress": True, "eval_every": 1},
        data={"num_workers": available_cpus() + 2},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config, data=synthetic_data())
    assert "\x1b[A" not in capsys.readouterr().err  # captured stderr is not a terminal
    assert not [w for w in caught if "worker processes" in str(w.message)]


def test_an_unwritable_embedding_cache_only_warns(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    model = build_model(tiny_config(tmp_path))
    data = synthetic_data(8)
    with pytest.warns(UserWarning, match="could not write the embedding cache"):
        results = evaluate(model, data.val, batch_size=4, cache_dir=blocker / "cache", progress=False)
    assert results["cache"] is None and results["num_videos"] == 8 and "R1" in results["t2v"]


def test_a_full_disk_under_the_embedding_cache_only_warns(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    evaluate_module = importlib.import_module("tempme_train.evaluate")

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(evaluate_module, "save_file", full_disk)
    model = build_model(tiny_config(tmp_path))
    with pytest.warns(UserWarning, match="could not write the embedding cache .*No space left on device"):
        results = evaluate(model, synthetic_data(8).val, batch_size=4, cache_dir=tmp_path / "cache", progress=False)
    assert results["cache"] is None and "R1" in results["t2v"]


# --- stopping part-way keeps what was done; unusable data and divergence stop early -------------------


def checkpoint_progress(output_dir: Path) -> dict:
    return torch.load(output_dir / LAST / "state.pt", weights_only=False)["progress"]


def interrupt_validation(monkeypatch, error: BaseException, calls: int = 1) -> None:
    """Make the ``calls``-th validation of a run raise ``error`` (later ones run normally)."""
    import importlib

    train_module = importlib.import_module("tempme_train.train")
    real_evaluate = train_module.evaluate
    seen = []

    def evaluate_or_raise(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            raise error
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", evaluate_or_raise)


def val_steps_logged(output_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["step"] for record in records if record["kind"] == "val"]


def test_ctrl_c_during_the_last_validation_leaves_it_to_the_resumed_run(tmp_path, monkeypatch):
    data = synthetic_data()  # 2 steps per epoch, 1 epoch: the only validation is at the last step
    config = tiny_config(tmp_path, optim={"epochs": 1})
    interrupt_validation(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        train(config, data=data)
    assert checkpoint_step(tmp_path) == 2 and checkpoint_progress(tmp_path)["validation_due"]
    assert not (tmp_path / "best.safetensors").exists()
    monkeypatch.undo()

    resumed = train(config, resume=True, data=data)
    assert resumed.steps == 2 and resumed.losses == []  # no step trained again
    assert resumed.best_step == 2 and (tmp_path / "best.safetensors").is_file()
    assert val_steps_logged(tmp_path) == [2]
    assert not checkpoint_progress(tmp_path)["validation_due"]


def test_a_run_without_validation_leaves_weights_the_run_folder_can_be_evaluated_by(tmp_path):
    from tempme_train.modeling import find_trained_weights

    summary = train(tiny_config(tmp_path, optim={"epochs": 1}), data=TrainData(SyntheticPairs(16), None))
    assert summary.best_weights is None and summary.final_weights == str(tmp_path / "weights.safetensors")
    assert find_trained_weights(tmp_path) == tmp_path / "weights.safetensors"
    config = tiny_config(tmp_path, optim={"epochs": 1})
    final = build_model(config)
    load_trained_weights(final, tmp_path / "weights.safetensors")
    last = trained_state(tmp_path, config)  # the finished run's parameters
    for name, param in trainable_parameters(final).items():
        assert torch.equal(param, last[name]), name


def test_an_error_during_training_saves_the_steps_done_and_says_how_to_resume(tmp_path, monkeypatch):
    from tempme.data import VideoDecodeError

    data = synthetic_data()  # 2 steps per epoch; the first checkpoint would be at step 2
    config = tiny_config(tmp_path, optim={"epochs": 2})
    interrupt_validation(monkeypatch, VideoDecodeError("held/v9.mp4", "unreadable container"))
    with pytest.raises(ValueError) as info:
        train(config, data=data)
    message = str(info.value)
    assert "\n" not in message and "held/v9.mp4: unreadable container" in message
    assert f"saved {tmp_path / LAST} at step 2/4" in message and "--resume" in message
    assert checkpoint_step(tmp_path) == 2 and checkpoint_progress(tmp_path)["validation_due"]
    monkeypatch.undo()
    resumed = train(config, resume=True, data=data)
    assert resumed.steps == 4 and len(resumed.losses) == 2 and val_steps_logged(tmp_path) == [2, 4]


def test_best_weights_are_never_written_before_a_checkpoint(tmp_path, monkeypatch):
    # Killed between the two (a full disk, SIGKILL), best weights without a checkpoint would leave a
    # run that can neither be resumed nor started again over them.
    train_module = importlib.import_module("tempme_train.train")
    real_save = train_module.save_trained_weights
    checked = []

    def save_checking(model, path, *args, **kwargs):
        if Path(path).name == "best.safetensors":
            checked.append(find_checkpoint(tmp_path) is not None)
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(train_module, "save_trained_weights", save_checking)
    train(tiny_config(tmp_path, optim={"epochs": 2}), data=synthetic_data())
    assert checked and all(checked)


def test_a_full_disk_at_a_checkpoint_is_one_line_that_says_what_the_run_still_holds(tmp_path, monkeypatch):
    # torch.save reports a full disk as "RuntimeError: [enforce fail at inline_container.cc ...]".
    checkpoint_module = importlib.import_module("tempme_train.checkpoint")
    real_save, saves = checkpoint_module.torch.save, []

    def save_until_full(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) > 2:  # step 2's two checkpoints (before and after its validation) are written
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_full)
    data = synthetic_data()
    config = tiny_config(tmp_path, optim={"epochs": 2})  # checkpoints at steps 2 and 4
    with pytest.raises(ValueError) as info:
        train(config, data=data)
    message = str(info.value)
    assert "\n" not in message and f"cannot write {tmp_path / LAST} ([enforce fail" in message, message
    assert message.count("MiB free on that disk") == 1 and ".tmp" not in message
    assert message.endswith(f"(training stopped: could not save {tmp_path / LAST} at step 4 (the same error); it "
                            "still holds step 2, to continue from with --resume once that is fixed)"), message
    assert checkpoint_step(tmp_path) == 2
    monkeypatch.undo()
    assert train(config, resume=True, data=data).steps == 4


def test_what_killed_saves_left_behind_is_removed_when_the_run_starts(tmp_path):
    stale = [tmp_path / ".last.tmp-k1ll3d", tmp_path / ".best.safetensors.a1b2c3.tmp"]
    stale[0].mkdir(parents=True)
    (stale[0] / "state.pt").write_bytes(b"half")
    stale[1].write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    for path in stale:
        os.utime(path, (two_hours_ago, two_hours_ago))
    # Under an hour old: maybe a save in flight (a requeued job's, say), not ours to remove.
    in_flight = tmp_path / ".last.tmp-w0rk1n"
    in_flight.mkdir()
    (tmp_path / ".other.tmp").write_bytes(b"not ours")
    train(tiny_config(tmp_path, optim={"epochs": 1}), data=synthetic_data())
    assert not any(path.exists() for path in stale) and in_flight.exists() and (tmp_path / ".other.tmp").exists()


def test_sigterm_is_handled_like_ctrl_c_and_the_handler_is_restored(tmp_path, monkeypatch, capsys):
    import importlib
    import signal

    train_module = importlib.import_module("tempme_train.train")
    # During step 3's update: it completes first.
    monkeypatch.setattr(
        train_module, "build_optimizer", signalling_optimizer(train_module.build_optimizer, signal.SIGTERM, update=3)
    )

    def outside_training(signum, frame):  # stands in for the default, which would end pytest itself
        raise RuntimeError("SIGTERM reached the handler outside training")

    before = signal.signal(signal.SIGTERM, outside_training)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(tmp_path), data=synthetic_data())  # 6 steps; checkpoints at 2, 4, 6
        assert signal.getsignal(signal.SIGTERM) is outside_training
    finally:
        signal.signal(signal.SIGTERM, before)
    assert checkpoint_step(tmp_path) == 3
    message = capsys.readouterr().err
    assert "SIGTERM" in message and "after step 3/6" in message and "--resume" in message


def test_an_empty_validation_set_is_refused_before_the_first_step(tmp_path):
    pairs = SyntheticPairs(16)
    empty = EvalSet("synthetic/none", SyntheticVideos(pairs), [], [], [])
    with pytest.raises(ValueError, match="nothing to validate on: the validation set synthetic/none has 0 videos"):
        train(tiny_config(tmp_path), data=TrainData(pairs, empty))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_diverging_loss_stops_at_once_naming_the_step_and_the_settings(tmp_path):
    from tempme_train.train import TrainingDiverged

    config = tiny_config(tmp_path, optim={"lr": 1e30, "warmup": 0.0})
    with pytest.raises(TrainingDiverged) as info:
        train(config, data=synthetic_data())
    message = str(info.value)
    assert "training diverged: the loss at step 2/6 is nan" in message
    assert "optim.lr=1e+30" in message and "optim.precision=fp32" in message
    assert find_checkpoint(tmp_path) is None  # the diverged parameters are not kept
    assert train_steps_logged(tmp_path) == [1]


def test_divergence_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import importlib

    train_module = importlib.import_module("tempme_train.train")
    real_compute = train_module.compute_gradients
    calls = []

    def nan_at_step_three(*args, **kwargs):
        calls.append(1)
        loss = real_compute(*args, **kwargs)
        return math.inf if len(calls) == 3 else loss

    monkeypatch.setattr(train_module, "compute_gradients", nan_at_step_three)
    with pytest.raises(ValueError, match=f"diverged: the loss at step 3/6 is inf .*{tmp_path / LAST} still holds step 2"):
        train(tiny_config(tmp_path), data=synthetic_data())
    assert checkpoint_step(tmp_path) == 2


class SomeUndecodable(SyntheticVideos):
    def __getitem__(self, i: int):
        return SkippedVideo(f"v{i}", Path(f"v{i}.mp4"), "corrupt") if i in (3, 5) else super().__getitem__(i)


def test_undecodable_validation_videos_are_reported(tmp_path):
    pairs = SyntheticPairs(16)
    val = EvalSet("synthetic/val", SomeUndecodable(pairs), [f"v{i}" for i in range(16)], pairs.captions, list(range(16)))
    summary = train(tiny_config(tmp_path, optim={"epochs": 1}), data=TrainData(pairs, val))
    assert summary.skipped_val_videos == ["v3", "v5"] and summary.skipped_videos == []


class AllUndecodable(SyntheticPairs):
    def __getitem__(self, i: int):
        return SkippedVideo(f"v{i}", Path(f"v{i}.mp4"), "corrupt")


def test_batches_of_only_undecodable_videos_are_reported_and_no_data_at_all_fails(tmp_path):
    from tempme_train.data import collate_train

    batch = collate_train([AllUndecodable(2)[0], AllUndecodable(2)[1]])
    assert batch == {"skipped": [AllUndecodable(2)[0], AllUndecodable(2)[1]]}
    with pytest.raises(ValueError, match="no training data: .*16 videos: v0, v1, v10") as info:
        train(tiny_config(tmp_path, optim={"epochs": 3}), data=TrainData(AllUndecodable(16), synthetic_data().val))
    named = str(info.value).split("16 videos: ")[1].split(" and 6 more")[0]
    assert len(named.split(", ")) == 10  # the first 10 are named, the rest counted
    assert not (tmp_path / "best.safetensors").exists() and find_checkpoint(tmp_path) is None


def test_resume_refuses_a_changed_training_set(tmp_path):
    from tempme_train.data import training_set_identity

    train(tiny_config(tmp_path, run={"stop_after": 1}), data=synthetic_data(16))
    with pytest.raises(ValueError, match="training set now has 24 .*trained on 16 .*start a new run"):
        train(tiny_config(tmp_path), resume=True, data=synthetic_data(24))
    assert checkpoint_step(tmp_path) == 1

    class Listed:  # shaped like RetrievalPairs: items and (video, caption) pairs
        def __init__(self, ids):
            self.items = [type("Item", (), {"video_id": vid})() for vid in ids]
            self.pairs = [(v, "a caption") for v in range(len(ids))]

        def __len__(self):
            return len(self.pairs)

    same, moved = training_set_identity(Listed(["a", "b"])), training_set_identity(Listed(["a", "c"]))
    assert same[0] == moved[0] == 2 and same[1] != moved[1]
    assert same == training_set_identity(Listed(["a", "b"]))


def test_processes_that_see_different_data_or_steps_are_refused_on_every_rank():
    from tempme_train.train import check_processes_agree

    val = (5, 7, "v1")
    check_processes_agree([(16, "abc", 4, val), (16, "abc", 4, val)])
    # Videos missing on one node (training or validation); another checkpoint.
    for other in [(24, "abd", 4, val), (16, "abc", 4, (4, 6, "v2")), (16, "abc", 6, val)]:
        with pytest.raises(
            ValueError, match="rank 0: 16 pairs, 5 validation videos, step 4; rank 1: .*same annotation files"
        ):
            check_processes_agree([(16, "abc", 4, val), other])


def test_a_second_signal_does_not_stop_the_save_after_a_stop():
    import signal

    from tempme_train.train import signals_ignored

    before = signal.getsignal(signal.SIGINT)
    with signals_ignored():
        signal.raise_signal(signal.SIGINT)  # Ctrl-C again, or torchrun's signal, during the save
        signal.raise_signal(signal.SIGTERM)
        finished = True
    assert finished and signal.getsignal(signal.SIGINT) is before


def set_a_gradient_at_step(monkeypatch, step: int, value: float) -> None:
    """Make the first trainable gradient's first element ``value`` after the loss of ``step`` is computed."""
    train_module = importlib.import_module("tempme_train.train")
    real_compute = train_module.compute_gradients
    calls = []

    def changed_at_step(model, batch, params, *args, **kwargs):
        calls.append(1)
        loss = real_compute(model, batch, params, *args, **kwargs)
        if len(calls) == step:
            params[0].grad.view(-1)[0] = value
        return loss

    monkeypatch.setattr(train_module, "compute_gradients", changed_at_step)


def test_nan_gradients_with_a_finite_loss_stop_training_before_the_update(tmp_path, monkeypatch):
    from tempme_train.train import TrainingDiverged

    set_a_gradient_at_step(monkeypatch, 2, math.nan)
    config = tiny_config(tmp_path, optim={"warmup": 0.0})
    with pytest.raises(TrainingDiverged, match="diverged: the gradient norm at step 2/6 is nan"):
        train(config, data=synthetic_data())
    assert find_checkpoint(tmp_path) is None  # nothing was saved with NaN weights


def test_weights_an_update_made_infinite_are_never_validated_or_saved(tmp_path, monkeypatch):
    # A finite loss with an update that makes weights non-finite (a huge learning rate; here an
    # infinite gradient, which nothing checks without gradient clipping): validation would find NaN
    # similarities and stop the run, and last/ must not keep those weights.
    from tempme_train.train import TrainingDiverged

    set_a_gradient_at_step(monkeypatch, 3, math.inf)
    config = tiny_config(tmp_path, optim={"warmup": 0.0, "grad_clip": 0.0}, run={"eval_every": 1})
    with pytest.raises(TrainingDiverged, match=f"the trained weights are not finite by step 3 .*{tmp_path / LAST} "
                       "still holds step 2"):
        train(config, data=synthetic_data())
    assert checkpoint_step(tmp_path) == 2
    weights = load_file(str(tmp_path / LAST / "weights.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_resume_refuses_the_same_videos_with_other_captions(tmp_path):
    """An edited annotation file keeps the videos and the number of pairs; the step numbers would then
    index into other captions. A checkpoint from before captions were recorded still resumes."""
    from tempme_train.checkpoint import Progress
    from tempme_train.data import training_captions_digest, training_set_identity
    from tempme_train.train import _check_same_training_set

    class Pairs:
        def __init__(self, captions):
            self.items = [tempme.data.VideoItem("v0", Path("v0.mp4")), tempme.data.VideoItem("v1", Path("v1.mp4"))]
            self.pairs = list(enumerate(captions))

        def __len__(self):
            return len(self.pairs)

    trained, edited = Pairs(["a dog runs", "a cat sleeps"]), Pairs(["a dog runs", "a cat eats"])
    size, videos = training_set_identity(trained)
    assert training_set_identity(edited) == (size, videos)  # same videos: only the captions tell them apart
    progress = Progress(train_size=size, train_digest=videos, train_captions_digest=training_captions_digest(trained))
    _check_same_training_set(progress, size, videos, training_captions_digest(trained), tmp_path)
    with pytest.raises(ValueError, match="cannot resume: .* but other captions"):
        _check_same_training_set(progress, size, videos, training_captions_digest(edited), tmp_path)
    older = Progress(train_size=size, train_digest=videos)  # written before captions were recorded
    _check_same_training_set(older, size, videos, training_captions_digest(edited), tmp_path)


def test_a_run_without_trained_weights_points_at_its_last_checkpoint(tmp_path):
    """A run stopped before its first validation has no best.safetensors, only last/."""
    from tempme_train.modeling import find_trained_weights

    (tmp_path / "run" / "last").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds none of weights.safetensors, best.safetensors$"):
        find_trained_weights(tmp_path / "run")
    (tmp_path / "run" / "last" / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"its last checkpoint is {tmp_path / 'run' / 'last'} \\(name that\\)"):
        find_trained_weights(tmp_path / "run")
    assert find_trained_weights(tmp_path / "run" / "last") == tmp_path / "run" / "last" / "weights.safetensors"


def test_validations_are_printed_while_training(tmp_path, capsys):
    """R@k is on the screen as training goes, not only in metrics.jsonl once it has ended."""
    config = tiny_config(tmp_path, optim={"epochs": 2}, run={"progress": True})
    train(config, data=synthetic_data())
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("validation at step")]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if r["kind"] == "val"]
    assert len(lines) == len(validations) == 2, lines
    first = validations[0]["t2v"]
    assert lines[0].startswith(f"validation at step {validations[0]['step']}/")
    assert f"text-to-video R@1 {first['R1']:.1f} R@5 {first['R5']:.1f} R@10 {first['R10']:.1f}" in lines[0]
    assert lines[0].endswith("(best so far)")


def test_training_and_evaluation_loaders_leave_stops_to_the_main_process(monkeypatch):
    """Their workers get quiet_worker_init (tested in test_data_dataset.py): a process-group stop
    neither fails them nor takes the batch of the step a multi-process run finishes first."""
    import importlib

    from tempme.data import quiet_worker_init
    from tempme_train.data import make_train_loader

    sampler = EpochSampler(8, 4, 1, 0, seed=0)
    loader = make_train_loader(SyntheticPairs(8), sampler, num_workers=0, pin_memory=False)
    assert loader.worker_init_fn is quiet_worker_init

    made = []

    class RecordedLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            made.append(kwargs.get("worker_init_fn"))
            super().__init__(*args, **kwargs)

    # The module, not the function the package exports by that name.
    monkeypatch.setattr(importlib.import_module("tempme_train.evaluate"), "DataLoader", RecordedLoader)
    model = build_model(tiny_config(Path("unused")))
    pairs = SyntheticPairs(3)
    eval_set = EvalSet("synthetic/3", SyntheticVideos(pairs), ["v0", "v1", "v2"], pairs.captions, [0, 1, 2])
    embed(model, eval_set, batch_size=2)
    assert made == [quiet_worker_init]


def test_a_run_stores_its_data_paths_absolute(tmp_path, monkeypatch):
    from tempme_train.checkpoint import CONFIG
    from tempme_train.config import load_config

    from tempme.weights import save_weights

    monkeypatch.chdir(tmp_path)
    save_weights(tempme.create_model(PRESET, method="none"), tmp_path / "clip.safetensors")
    config = tiny_config(tmp_path / "run", run={"stop_after": 1}, model={"weights": "clip.safetensors"})
    config.data.anno_path, config.data.video_dir = "anno/captions.csv", "~/videos"
    train(config, data=synthetic_data())
    stored = load_config(tmp_path / "run" / LAST / CONFIG)
    # Relative to the directory the run started in; a path from home is one (~ reads as the home folder).
    assert (stored.data.anno_path, stored.data.video_dir) == (
        str(tmp_path / "anno" / "captions.csv"), os.path.expanduser("~/videos"))
    assert stored.model.weights == str(tmp_path / "clip.safetensors")
    assert config.data.anno_path == "anno/captions.csv"  # the caller's config is left as it was
    # A run stored by an older tempme, with the weights as given, resumes from where it started.
    stored_file = tmp_path / "run" / LAST / CONFIG
    stored_file.write_text(stored_file.read_text().replace(str(tmp_path / "clip.safetensors"), "clip.safetensors"))
    resumed = tiny_config(tmp_path / "run", run={"stop_after": 2}, model={"weights": "clip.safetensors"})
    resumed.data.anno_path, resumed.data.video_dir = "anno/captions.csv", "~/videos"
    assert train(resumed, resume=True, data=synthetic_data()).steps == 2


def test_best_weights_go_to_a_higher_r1_then_to_a_lower_mean_rank():
    from tempme_train.train import is_better

    assert is_better(10.0, 9.0, None, None)  # the first validation
    assert is_better(50.0, 3.0, 40.0, 1.5)  # R@1 decides first, whatever the mean rank
    assert not is_better(40.0, 1.0, 50.0, 3.0)
    assert is_better(50.0, 2.5, 50.0, 3.0)  # a tie: the lower mean rank
    assert not is_better(50.0, 3.0, 50.0, 3.0) and not is_better(50.0, 3.5, 50.0, 3.0)
    assert not is_better(50.0, 1.0, 50.0, None)  # a checkpoint that did not record it: the first stays


def test_a_folder_of_runs_names_the_runs_in_it(tmp_path):
    from tempme_train.modeling import find_trained_weights

    for run, name in (("b_run", "best.safetensors"), ("a_run", "weights.safetensors")):
        (tmp_path / run).mkdir()
        (tmp_path / run / name).write_bytes(b"")
    (tmp_path / "notes").mkdir()
    with pytest.raises(FileNotFoundError, match=r"; the runs in it: a_run, b_run \(name one\)$"):
        find_trained_weights(tmp_path)


def test_a_full_disk_at_the_first_checkpoint_says_there_is_none_to_resume(tmp_path, monkeypatch):
    checkpoint_module = importlib.import_module("tempme_train.checkpoint")

    def disk_full(obj, path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(ValueError) as info:
        train(tiny_config(tmp_path, optim={"epochs": 1}), data=synthetic_data())
    message = str(info.value)
    assert message.endswith("; there is none)") and "--resume" not in message, message


def sharing_worker(rank: int, port: int, folder: str) -> None:
    """One of four processes failing in one ``failures_shared`` block: 0 and 1 with the same bad
    setting, 2 and 3 with the same TypeError; what each raises goes to a file."""
    from tempme_train.distributed import failures_shared

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4)
    errors = [ValueError("run.yaml: optim.lr: must be positive (got -1)")] * 2 + [TypeError("frames: not an int")] * 2
    try:
        with failures_shared():
            raise errors[rank]
    except Exception as error:  # noqa: BLE001 - the test reads it
        (Path(folder) / f"rank{rank}.txt").write_text(f"{type(error).__name__}: {error}")
    torch.distributed.destroy_process_group()


def test_an_error_several_processes_share_is_theirs_on_the_lowest_rank_only(tmp_path, monkeypatch, capsys):
    # Every process checks the same config: each printing its copy says nothing more than rank 0's.
    mp.spawn(sharing_worker, args=(free_port(), str(tmp_path)), nprocs=4, join=True)
    raised = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(4)]
    # A TypeError is bad input too (one line, exit code 2), where a RuntimeError would be a traceback.
    assert raised == ["ValueError: run.yaml: optim.lr: must be positive (got -1)",
                      "BadInputElsewhere: process 0 of 4 failed: ValueError: run.yaml: optim.lr: must be positive (got -1)",
                      "TypeError: frames: not an int",
                      "BadInputElsewhere: process 2 of 4 failed: TypeError: frames: not an int"]

    # Which of them the command line prints: a process's own error always, another's on rank 0 only.
    from tempme_cli.main import shown_by_another_process
    from tempme_train.distributed import BadInputElsewhere, world_from_env
    from tempme_train.train import run_device

    config_with_device = apply_overrides(tiny_config(tmp_path), ["run.device=cuda"])

    elsewhere = BadInputElsewhere("process 2 of 3 failed: OSError: disk full")
    monkeypatch.setenv("WORLD_SIZE", "3")
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert not shown_by_another_process(OSError("disk full"))
        assert shown_by_another_process(elsewhere) == (rank > 0)
        # A bad setting all of a machine's processes read is the first's to print; its GPU is each one's own.
        assert shown_by_another_process(ConfigError("run.yaml", "optim.lr", -1, "must be positive")) == (rank > 0)
        assert shown_by_another_process(ConfigError("run.yaml", "run.device", "gpu", "expected auto ...")) == (rank > 0)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        try:
            run_device("cuda", world_from_env(), "run.yaml")
            assert rank == 0
        except ConfigError as error:  # after config.blame, as train() raises it
            assert rank > 0 and not shown_by_another_process(config_with_device.blame(error))


def test_only_errors_that_say_another_process_went_away_count_as_such():
    from tempme_train.distributed import BadInputElsewhere, lost_another_process

    gloo = "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:22405: Connection reset by peer"
    assert lost_another_process(RuntimeError(gloo))
    assert lost_another_process(RuntimeError("[pair.cc:589] Connection closed by peer [127.0.0.1]:41234"))
    assert lost_another_process(RuntimeError("NCCL error: remote process exited or there was a network error"))
    assert lost_another_process(RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed "
                                             "out waiting 20000ms for recv operation to complete"))
    # This process's own failures, NCCL's included, are not another process going away.
    assert not lost_another_process(RuntimeError("NCCL error in: ProcessGroupNCCL.cpp, unhandled cuda error, "
                                                 "Cuda failure 'out of memory'"))
    assert not lost_another_process(RuntimeError("CUDA out of memory"))
    assert not lost_another_process(ValueError("Connection reset by peer"))
    assert not lost_another_process(BadInputElsewhere("process 1 of 2 failed: Connection reset by peer"))


def test_decoding_workers_share_the_machine_s_cpus_among_its_processes(monkeypatch):
    from tempme import workers

    monkeypatch.setattr(workers, "available_cpus", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [workers.decoding_workers(n, 100) for n in (0, 4, 16)] == [0, 4, 8]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node 4: 2 CPUs each
    assert [workers.decoding_workers(n, 100) for n in (0, 1, 4)] == [0, 1, 2]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # more processes than CPUs: one worker each all the same
    assert workers.decoding_workers(4, 100) == 1


def test_decoding_workers_are_no_more_than_their_tasks(monkeypatch):
    from tempme import workers

    monkeypatch.setattr(workers, "available_cpus", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [workers.decoding_workers(10_000, tasks) for tasks in (0, 1, 3, 100)] == [0, 1, 3, 64]


def test_train_and_eval_loaders_start_a_worker_per_batch_at_most(monkeypatch):
    from tempme import workers

    evaluation = importlib.import_module("tempme_train.evaluate")  # the package's `evaluate` is the function
    monkeypatch.setattr(workers, "available_cpus", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    from tempme_train.data import make_train_loader

    sampler = EpochSampler(size=8, global_batch=4)  # 2 batches an epoch
    assert make_train_loader(SyntheticPairs(8), sampler, num_workers=16, pin_memory=False).num_workers == 2
    started = []

    class RecordedLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            started.append(kwargs["num_workers"])
            super().__init__(*args, **{**kwargs, "num_workers": 0})  # no process to start for that

    monkeypatch.setattr(evaluation, "DataLoader", RecordedLoader)
    model = build_model(tiny_config(Path("unused")))
    evaluate(model, synthetic_data(5).val, batch_size=2, num_workers=16, progress=False)
    assert started == [3]  # 5 videos in batches of 2
