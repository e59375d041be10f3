"""End to end on real (tiny) video files: tempme prepare, train, resume and eval through the CLI.

An MSRVTT-format dataset of 12 short clips, one of them corrupt and one missing, and a 32-pixel
model registered as a preset; nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tempme
from tempme.config import default_merge_config, get_preset
from tempme.data import frames_to_tensor, read_frames
from tempme.flops import count_video_flops
from tempme.search import model_fingerprint
from tempme_cli.main import main
from tempme_train.modeling import build_model, load_trained_weights, train_config_of
from tempme_train.config import CONFIG_DIR

from tiny_models import register_tiny_preset

PRESET = register_tiny_preset("test-tiny-e2e")
TRAIN_IDS = [f"video{i}" for i in range(10)]
TEST_IDS = ["video20", "video21", "video22"]
CORRUPT, MISSING = "video2", "video5"
# The exit status of a command that finished but left videos out: every one that reads the training
# split (train, prepare) leaves out MISSING, whose file is not there.
LEFT_OUT = 1


pytestmark = pytest.mark.usefixtures("one_thread")


def write_clip(path: Path, seed: int) -> None:
    """A 3 s, 5 fps, 32x32 clip of smoothly moving colour noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(5))
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for index in range(15):
            pixels = np.roll(base, index, axis=1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("msrvtt")
    anno, videos = root / "anno", root / "videos"
    anno.mkdir()
    videos.mkdir()
    (anno / "MSRVTT_train.9k.csv").write_text("video_id\n" + "\n".join(TRAIN_IDS) + "\n")
    sentences = [
        {"video_id": vid, "caption": f"clip {i} take {k} of a {['red', 'blue', 'green'][k % 3]} scene", "sen_id": 2 * i + k}
        for i, vid in enumerate(TRAIN_IDS)
        for k in range(2)
    ]
    (anno / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    with open(anno / "MSRVTT_JSFUSION_test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        for i, vid in enumerate(TEST_IDS):
            writer.writerow([f"ret{i}", f"msr{i}", vid, f"test clip number {i}"])
    for seed, vid in enumerate(TRAIN_IDS + TEST_IDS):
        if vid == CORRUPT:
            (videos / f"{vid}.mp4").write_bytes(b"not a video at all" * 100)
        elif vid != MISSING:
            write_clip(videos / f"{vid}.mp4", seed)
    config = root / "run.yaml"
    config.write_text(
        f"""\
base: {CONFIG_DIR / '_msrvtt.yaml'}
model: {{preset: {PRESET}, weights: null, frames: 4}}
data:
  anno_path: {anno}
  video_dir: {videos}
  holdout_videos: 3
  max_frames: 4
  image_size: 32
  max_words: 16
  num_workers: 1
optim: {{batch_size: 4, epochs: 2, lr: 1.0e-2}}
run: {{output_dir: {root / 'run'}, eval_every: 2, log_every: 1, progress: false}}
"""
    )
    return config


def test_train_stop_resume_and_evaluate(run_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEMPME_CACHE", str(tmp_path / "cache"))
    output = run_config.parent / "run"
    # 7 training videos with files (10 - 3 held out) minus the missing one -> 12 pairs, 3 steps per epoch.
    with pytest.warns(UserWarning, match=MISSING):
        assert main(["train", "--config", str(run_config), "run.stop_after=2"]) == LEFT_OUT
    printed, said = capsys.readouterr()
    assert "steps: 2/6 (stopped early" in printed and f"missing videos (1): {MISSING}" in printed
    assert said.endswith("tempme train: finished, but left out 1 missing video\n"), said
    with pytest.warns(UserWarning, match=MISSING):
        assert main(["train", "--config", str(run_config), "--resume"]) == LEFT_OUT
    printed, said = capsys.readouterr()
    assert "steps: 6/6\n" in printed and f"undecodable (skipped) videos (1): {CORRUPT}" in printed
    assert said.endswith("tempme train: finished, but left out 1 missing video and 1 undecodable video\n"), said
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    validations = [r for r in records if r["kind"] == "val"]
    assert validations and all(r["t2v"]["num_queries"] == 6 for r in validations)  # 3 held-out videos x 2

    assert main(["eval", "--checkpoint", str(output), "--json"]) == 0  # every test video there and decodable
    first, said = capsys.readouterr()
    first = json.loads(first)
    assert "finished, but" not in said and (first["missing"], first["skipped"]) == ([], [])
    assert first["split"] == "test" and first["num_videos"] == 3 and first["weights"].endswith("best.safetensors")
    assert set(first["t2v"]) >= {"R1", "R5", "R10", "R50", "MdR", "MnR", "RSum"}
    assert first["cache"].startswith(str(tmp_path / "cache"))
    assert (first["model"]["method"], first["model"]["frames"], first["model"]["precision"]) == ("tempme", 4, "fp32")
    built = build_model(train_config_of(output / "best.safetensors")).config.merge
    assert first["model"]["schedule"] == json.loads(json.dumps({
        name: getattr(built, name) for name in ("tome_r", "merge_layers", "clips_joined", "cross_merge_ratio",
                                                 "intra_merge_ratio", "clip_pos_embed", "prop_attn")}))
    assert main(["eval", "--checkpoint", str(output), "--split", "train"]) == LEFT_OUT
    table, said = capsys.readouterr()  # the split lists video5, whose file is missing, and corrupt video2
    assert "8 videos (1 missing, 1 undecodable left out)" in table and "model: tempme, 4 frames, LoRA rank 8, fp32" in table
    assert f"1 undecodable video (left out): {CORRUPT} (unreadable container" in table
    assert said.endswith("tempme eval: finished, but left out 1 missing video and 1 undecodable video\n"), said
    # Again, the embeddings from the cache, which keeps no reasons: skipped as `tempme index --json` has it.
    assert main(["eval", "--checkpoint", str(output), "--split", "train", "--json"]) == LEFT_OUT
    on_train = json.loads(capsys.readouterr().out)
    assert on_train["missing"] == [MISSING] and [sorted(video) for video in on_train["skipped"]] == [["path", "reason", "video"]]
    (skipped,) = on_train["skipped"]
    videos = run_config.parent / "videos"
    assert (skipped["video"], skipped["path"]) == (CORRUPT, str(videos / f"{CORRUPT}.mp4"))
    assert skipped["reason"].startswith("unreadable container")
    flops = count_video_flops(build_model(train_config_of(output / "best.safetensors")).config)
    assert (first["model"]["tokens"], first["model"]["gflops"]) == (flops.tokens, round(flops.gflops, 2))
    assert f"video encoder: {flops.tokens} tokens, {flops.gflops:.1f} GFLOPs per video" in table
    # The settings of a method that merges nothing are not reported as if they counted.
    assert main(["eval", "--checkpoint", str(output), "--method", "none", "--json", "--no-cache"]) == 0
    unmerged = json.loads(capsys.readouterr().out)["model"]
    assert unmerged["schedule"] == {} and unmerged["tokens"] == 4 * (1 + (32 // 16) ** 2)  # 4 frames of 5 tokens
    assert main(["eval", "--checkpoint", str(output / "last"), "--json", "--split", "val"]) == 0
    val = json.loads(capsys.readouterr().out)
    assert val["num_captions"] == 6 and val["v2t"]["num_queries"] == 3
    assert main(["eval", "--checkpoint", str(output), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cache"] == first["cache"]

    # The trained run searches a folder of videos: index with the checkpoint, search finds it again.
    test_videos = [str(run_config.parent / "videos" / f"{vid}.mp4") for vid in TEST_IDS]
    index = tmp_path / "test.index"
    assert main(["index", *test_videos, "--checkpoint", str(output), "--out", str(index), "--device", "cpu",
                 "--workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 3
    assert main(["search", str(index), "test clip number 1", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    config = train_config_of(output / "best.safetensors")
    model = build_model(config).eval()
    untrained = model_fingerprint(model)
    load_trained_weights(model, output / "best.safetensors")
    assert model_fingerprint(model) != untrained  # the adapters changed something
    with torch.no_grad():
        text = model.encode_text(["test clip number 1"])
        videos = torch.stack([model.encode_video(frames_to_tensor(read_frames(v, 4), 32)[None])[0] for v in test_videos])
    scores = (F.normalize(text, dim=-1) @ F.normalize(videos, dim=-1).T)[0]
    assert [h["path"] for h in hits] == [str(Path(test_videos[i]).resolve()) for i in scores.argsort(descending=True)]
    assert [h["score"] for h in hits] == pytest.approx(scores.sort(descending=True).values.tolist(), abs=1e-3)


def test_a_checkpoint_evaluated_with_a_config_keeps_the_model_it_was_trained_as(run_config, capsys, tmp_path):
    output = tmp_path / "ablation"
    with pytest.warns(UserWarning, match=MISSING):
        assert main(["train", "--config", str(run_config), "model.schedule.clip_pos_embed=false", "run.stop_after=1",
                     "--output", str(output)]) == LEFT_OUT
    capsys.readouterr()
    # The config only says where the data is; its schedule is not the one the adapters were trained in.
    with pytest.warns(UserWarning, match=rf"run.yaml sets model.schedule.clip_pos_embed differently from the model {output / 'last'}"):
        assert main(["eval", "--checkpoint", str(output / "last"), "--config", str(run_config), "--json", "--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["schedule"]["clip_pos_embed"] is False
    # With other frames too (an option): the warning names what the trained model replaced, only that.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["eval", "--checkpoint", str(output / "last"), "--config", str(run_config), "--frames", "2",
                     "--json", "--no-cache"]) == 0
    capsys.readouterr()
    (told,) = [str(warning.message) for warning in caught if "differently from the model" in str(warning.message)]
    assert told.startswith(f"{run_config} sets model.schedule.clip_pos_embed differently from the model"), told
    assert told.endswith("give them as KEY=VALUE, e.g. model.schedule.clip_pos_embed=true)"), told
    # A config that writes out the paper's schedule the run was trained with sets nothing otherwise.
    paper_b16 = default_merge_config(get_preset(PRESET), 4, "tempme")
    written_out = tmp_path / "written_out.yaml"
    written_out.write_text(f"base: {run_config}\nmodel: {{schedule: {{tome_r: {paper_b16.tome_r}, "
                           f"merge_layers: {list(paper_b16.merge_layers)}, clip_pos_embed: false}}}}\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["eval", "--checkpoint", str(output / "last"), "--config", str(written_out), "--json",
                     "--no-cache"]) == 0
    capsys.readouterr()
    assert not [warning for warning in caught if "differently from the model" in str(warning.message)]
    # Given as an override, another model is what is asked for, and nothing is warned about.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["eval", "--checkpoint", str(output / "last"), "--config", str(run_config),
                     "model.schedule.clip_pos_embed=true", "--json", "--no-cache"]) == 0
    assert not [warning for warning in caught if "differently from the model" in str(warning.message)]
    assert json.loads(capsys.readouterr().out)["model"]["schedule"]["clip_pos_embed"] is True
    # Weights that tempme train did not write have no trained model to keep: the config's is evaluated.
    from tempme.weights import save_weights

    plain = save_weights(tempme.create_model(PRESET, frames=4), tmp_path / "plain.safetensors")
    assert main(["eval", "--checkpoint", str(plain), "--config", str(run_config), "--json", "--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["schedule"]["clip_pos_embed"] is True
    # A run on base weights, evaluated with a config that names none: the base is the run's, unwarned.
    on_base = tmp_path / "on_base"
    with pytest.warns(UserWarning, match=MISSING):
        assert main(["train", "--config", str(run_config), f"model.weights={plain}", "run.stop_after=1",
                     "--output", str(on_base)]) == LEFT_OUT
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["eval", "--checkpoint", str(on_base / "last"), "--config", str(run_config), "--json",
                     "--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["base_weights"] == str(plain)
    assert not [warning for warning in caught if "differently from the model" in str(warning.message)]
    # A config naming other base weights (bundled ones name a preset) does not move the run off its own.
    other_base = tmp_path / "other_base.yaml"
    other_base.write_text(f"base: {run_config}\nmodel: {{weights: {tmp_path / 'elsewhere.pt'}}}\n")
    assert main(["eval", "--checkpoint", str(on_base / "last"), "--config", str(other_base), "--json",
                 "--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["base_weights"] == str(plain)
    # Another method takes the paper's schedule for it, as `tempme flops --method` does: the run's
    # clip_pos_embed=false is no setting of tome's, and not warned about as if the user had set it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["eval", "--checkpoint", str(output / "last"), "--method", "tome", "--json", "--no-cache"]) == 0
    assert not [warning for warning in caught if "never reads" in str(warning.message)]
    paper = default_merge_config(get_preset(PRESET), 4, "tome")
    assert json.loads(capsys.readouterr().out)["model"]["schedule"] == {"tome_r": paper.tome_r, "prop_attn": True}


def test_a_fully_fine_tuned_run_is_evaluated_without_its_base_weights(run_config, capsys, tmp_path):
    from tempme.weights import save_weights
    from tempme_train.modeling import load_trained_model

    base = save_weights(tempme.create_model(PRESET, frames=4), tmp_path / "base.safetensors")
    output = tmp_path / "full"
    with pytest.warns(UserWarning, match=MISSING):
        assert main(["train", "--config", str(run_config), f"model.weights={base}", "model.trainable=full",
                     "run.stop_after=1", "--output", str(output)]) == LEFT_OUT
    capsys.readouterr()
    base.rename(tmp_path / "moved.safetensors")  # every weight is in the run's file: the base is not needed
    assert main(["eval", "--checkpoint", str(output / "last"), "--json", "--no-cache"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(output / "last"), "--config", str(run_config), "--json", "--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["t2v"] == whole["t2v"]
    assert load_trained_model(output / "last").config.clip == get_preset(PRESET)


def test_a_run_on_a_random_backbone_is_evaluated_with_a_config_of_another_seed(run_config, capsys, tmp_path):
    output = tmp_path / "random"
    with pytest.warns(UserWarning, match=MISSING):
        assert main(["train", "--config", str(run_config), "run.stop_after=1", "--output", str(output)]) == LEFT_OUT
    capsys.readouterr()
    other_seed = tmp_path / "other_seed.yaml"
    other_seed.write_text(f"base: {run_config}\noptim: {{seed: 7}}\n")  # its backbone would be another one
    assert main(["eval", "--checkpoint", str(output / "last"), "--config", str(other_seed), "--json", "--no-cache"]) == 0
    with_seed = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(output / "last"), "--json", "--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["t2v"] == with_seed["t2v"]


def test_zero_shot_eval_prints_a_table(run_config, capsys, tmp_path):
    assert main(["eval", "--config", str(run_config), "--cache-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Text->Video" in printed and "Video->Text" in printed and "R@1" in printed


def test_eval_names_the_annotations_its_split_reads(tmp_path, capsys):
    from data_fixtures import build_activitynet

    anet = build_activitynet(tmp_path)
    config = tmp_path / "anet.yaml"
    config.write_text(f"base: {CONFIG_DIR / '_activitynet.yaml'}\n"
                      f"model: {{preset: {PRESET}, weights: null, frames: 4}}\n"
                      f"data: {{anno_path: {anet.anno_dir}, video_dir: {anet.video_dir}, holdout_videos: 1, "
                      "max_frames: 4, image_size: 32, num_workers: 0}\n")
    assert main(["eval", "--config", str(config), "--no-cache"]) == 0
    assert capsys.readouterr().out.startswith("activitynet test (val_1): 1 captions, 1 videos;")
    assert main(["eval", "--config", str(config), "--split", "val", "--json", "--no-cache"]) == 0
    held_out = json.loads(capsys.readouterr().out)
    assert (held_out["split"], held_out["annotation_split"], held_out["num_videos"]) == (
        "val", "1 video held out of train", 1)
    assert main(["eval", "--config", str(config), "--split", "val_1", "--no-cache"]) == 0
    assert capsys.readouterr().out.startswith("activitynet val_1: 1 captions, 1 videos;")


def eval_worker(rank: int, port: int, config: str, folder: str, options: list[str]) -> None:
    """``tempme eval`` as process ``rank`` of 2 (what torchrun sets up); its standard output and
    error (its loader workers' too) go to files."""
    import contextlib
    import os
    import sys

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    with open(Path(folder) / f"err{rank}.txt", "w") as err:
        os.dup2(err.fileno(), sys.stderr.fileno())
    with open(Path(folder) / f"out{rank}.txt", "w") as out, contextlib.redirect_stdout(out):
        code = main(["eval", "--config", config, "--json", "--no-cache", "--batch-size", "1", *options])
    sys.stderr.flush()
    (Path(folder) / f"code{rank}.txt").write_text(str(code))


def run_eval_as_two_processes(config: Path, folder: Path, *options: str) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(eval_worker, args=(port, str(config), str(folder), list(options)), nprocs=2, join=True)


def test_eval_under_torchrun_splits_the_videos_and_rank_0_reports_what_one_process_would(run_config, tmp_path, capsys):
    run_eval_as_two_processes(run_config, tmp_path)
    assert [(tmp_path / f"code{rank}.txt").read_text() for rank in (0, 1)] == ["0", "0"]
    assert (tmp_path / "out1.txt").read_text() == ""  # only rank 0 reports
    shared = json.loads((tmp_path / "out0.txt").read_text())

    assert main(["eval", "--config", str(run_config), "--json", "--no-cache", "--batch-size", "1"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert shared["num_videos"] == alone["num_videos"] == len(TEST_IDS)
    assert shared["t2v"] == alone["t2v"] and shared["v2t"] == alone["v2t"]


def test_under_torchrun_a_warning_about_the_data_is_printed_once_and_skipped_videos_by_their_process(
    run_config, tmp_path
):
    run_eval_as_two_processes(run_config, tmp_path, "--split", "train")  # video5 is missing, video2 corrupt
    assert [(tmp_path / f"code{rank}.txt").read_text() for rank in (0, 1)] == ["0", "0"]
    errors = [(tmp_path / f"err{rank}.txt").read_text() for rank in (0, 1)]
    assert [text.count("videos are missing") for text in errors] == [1, 0]
    assert sum(text.count(f"skipping video '{CORRUPT}'") for text in errors) == 1


def test_under_torchrun_a_bad_setting_is_printed_by_the_first_process_only(run_config, tmp_path):
    run_eval_as_two_processes(run_config, tmp_path, "--split", "tset")
    assert [(tmp_path / f"code{rank}.txt").read_text() for rank in (0, 1)] == ["2", "2"]
    errors = [(tmp_path / f"err{rank}.txt").read_text() for rank in (0, 1)]
    assert errors[0].startswith("tempme eval: error: ") and "tset" in errors[0] and errors[0].count("\n") == 1, errors
    assert errors[1] == ""


def test_a_run_without_validation_keeps_its_final_weights(run_config, tmp_path, capsys):
    output = tmp_path / "run"
    with pytest.warns(UserWarning, match=MISSING):
        assert main(["train", "--config", str(run_config), "data.val_split=none", "optim.epochs=1",
                     "--output", str(output)]) == LEFT_OUT
    printed = capsys.readouterr().out
    assert f"final weights: {output / 'weights.safetensors'}" in printed and "best validation" not in printed
    assert not (output / "best.safetensors").exists()
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert not [record for record in records if record["kind"] == "val"]
    # All 9 training videos with files trained (none held out): 18 pairs, 4 steps of 4.
    assert [record["step"] for record in records if record["kind"] == "train"] == [1, 2, 3, 4]
    assert main(["eval", "--checkpoint", str(output), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == str(output / "weights.safetensors")
    assert main(["eval", "--checkpoint", str(output), "--split", "val"]) == 2
    assert "data.val_split" in capsys.readouterr().err
    # Preparing its frame cache leaves out the validation set it does not have.
    assert main(["prepare", "--config", str(run_config), "data.val_split=none", f"data.frame_cache={tmp_path / 'f'}",
                 "--workers", "0"]) == LEFT_OUT
    assert "11 videos cached, 1 undecodable, 1 missing" in capsys.readouterr().out


def test_an_undecodable_training_video_is_warned_about_once_in_a_run(run_config, tmp_path):
    # Three epochs, each read by new loader workers, which remember no warning of the epoch before: the
    # main process warns, once.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--config", str(run_config), "optim.epochs=3", "--output", str(tmp_path)]) == LEFT_OUT
    (told,) = [str(warning.message) for warning in caught if "skipping video" in str(warning.message)]
    assert told.startswith(f"skipping video '{CORRUPT}' for the rest of the run: cannot decode "), told


def test_validating_on_the_test_split_is_warned_about(run_config, tmp_path, capsys):
    with pytest.warns(UserWarning, match="data.val_split=test is the test split"):
        assert main(["train", "--config", str(run_config), "data.val_split=test", "run.stop_after=2",
                     "--output", str(tmp_path / "run")]) == LEFT_OUT
    assert (tmp_path / "run" / "best.safetensors").exists()
    capsys.readouterr()
    with pytest.warns(UserWarning, match="was chosen by validating on this test split"):  # where it matters
        assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--json", "--no-cache"]) == 0
    assert "chosen by validating" in json.loads(capsys.readouterr().out)["warning"]
    with pytest.warns(UserWarning, match="was chosen by validating on this test split"):  # --split val is it too
        assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--split", "val", "--json", "--no-cache"]) == 0


def test_prepare_fills_the_frame_cache_and_lists_bad_videos(run_config, tmp_path, capsys):
    cache = tmp_path / "frames"
    assert main(["prepare", "--config", str(run_config), f"data.frame_cache={cache}", "--workers", "0"]) == LEFT_OUT
    printed, said = capsys.readouterr()
    assert "11 videos cached, 1 undecodable, 1 missing" in printed
    assert CORRUPT in printed and MISSING in printed
    assert said.endswith("tempme prepare: finished, but left out 1 undecodable video and 1 missing video\n"), said
    assert len(list(cache.rglob("*.npy"))) == 11
    # The test split has every video, cached now: done.
    assert main(["prepare", "--config", str(run_config), f"data.frame_cache={cache}", "--splits", "test"]) == 0
    assert "3 videos cached, 0 undecodable, 0 missing" in capsys.readouterr().out
    # data.strict: the bad videos are an error, as in training and evaluation; the others are cached.
    strict = tmp_path / "strict"
    assert main(["prepare", "--config", str(run_config), f"data.frame_cache={strict}", "data.strict=true",
                 "--workers", "0"]) == 2
    printed, said = capsys.readouterr()
    assert CORRUPT in printed and MISSING in printed
    assert said == ("tempme prepare: error: data.strict is set and 1 undecodable video and 1 missing video were "
                    "found (listed above); the frames of the others are cached\n"), said
    assert len(list(strict.rglob("*.npy"))) == 11


def test_prepare_that_caches_nothing_is_an_error(run_config, tmp_path, capsys):
    cache = f"data.frame_cache={tmp_path / 'frames'}"
    (tmp_path / "empty").mkdir()
    assert main(["prepare", "--config", str(run_config), cache, f"data.video_dir={tmp_path / 'empty'}"]) == 2
    error = one_error_line(capsys)
    assert f"data.video_dir: none of the 13 videos of train, val, test is there (got '{tmp_path / 'empty'}')" in error
    videos = run_config.parent / "videos"
    captions = custom_captions(tmp_path / "captions.csv", [CORRUPT], videos)
    assert main(["prepare", "--config", str(run_config), cache, "data.dataset=custom", f"data.anno_path={captions}",
                 "--splits", "test", "--workers", "0"]) == 2
    printed, said = capsys.readouterr()
    assert "0 videos cached, 1 undecodable, 0 missing" in printed and f"undecodable: {videos / CORRUPT}.mp4" in printed
    # The cache's folder for 4 frames at 1 fps, 32 pixels (FrameCache.folder).
    folder = tmp_path / "frames" / "m4_r1_s32"
    assert said == f"tempme prepare: error: the 1 video there could not be decoded, so none is in {folder}\n"


def test_prepare_under_torchrun_shares_the_videos_between_processes(run_config, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "frames"
    printed, bars = [], []
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        # 0 where one process would exit 1: torchrun takes that for a crash (and may start all over).
        assert main(["prepare", "--config", str(run_config), f"data.frame_cache={cache}", "--workers", "0",
                     "run.progress=true"]) == 0
        captured = capsys.readouterr()
        printed.append(captured.out)
        bars.append("caching frames" in captured.err)
        said_left_out = "tempme prepare: finished, but left out 1 undecodable video and 1 missing video\n"
        assert captured.err.endswith(said_left_out) == (rank == 0), captured.err
        if rank == 1:  # 12 of the 13 videos exist, the third one corrupt: every other one is rank 1's
            assert "(process 1 of 2): 6 videos cached, 0 undecodable, 0 missing" in printed[0]
            assert len(list(cache.rglob("*.npy"))) == 6
    assert "(process 0 of 2): 5 videos cached, 1 undecodable, 1 missing" in printed[1]
    assert CORRUPT in printed[1] and MISSING in printed[1]
    assert len(list(cache.rglob("*.npy"))) == 11  # as one process caches them
    assert bars == [False, True]  # one progress bar, rank 0's: two would draw over each other


def test_index_refuses_to_run_under_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["index", str(tmp_path), "--weights", "tiny-B/32", "--out", str(tmp_path / "v.index")]) == 2
    assert "start it without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "v.index").exists()


def test_bad_settings_fail_before_training_with_the_key_and_value(run_config, tmp_path, capsys):
    assert main(["train", "--config", str(run_config), "data.video_dir=/no/such/folder", "--output", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "data.video_dir" in error and "/no/such/folder" in error
    assert main(["train", "--config", str(run_config), "optim.lr=fast", "--output", str(tmp_path)]) == 2
    assert "optim.lr" in capsys.readouterr().err and not (tmp_path / "metrics.jsonl").exists()
    impossible = ["train", "--config", str(run_config), "model.schedule.clips_joined=[2,2,5]", "--output", str(tmp_path)]
    assert main(impossible) == 2
    error = capsys.readouterr().err
    assert "cannot join 5 clips at layer" in error and not (tmp_path / "metrics.jsonl").exists()
    # Named as the override that set it, with its value, not as the config file or the weights.
    assert error.startswith("tempme train: error: command-line override 'model.schedule.clips_joined=[2,2,5]': "
                            "model.schedule.clips_joined: cannot join 5 clips at layer")
    assert error.endswith("clips_joined=[2, 2, 5]); each step must divide the clip count\n")
    # Before the data or the weights are read: a ratio is wrong whatever the weights.
    bad_ratio = ["train", "--config", str(run_config), "model.schedule.cross_merge_ratio=1.5",
                 "data.anno_path=/no/such/annotations", "model.weights=/no/such/weights.pt", "--output", str(tmp_path)]
    assert main(bad_ratio) == 2
    assert capsys.readouterr().err == (
        "tempme train: error: command-line override 'model.schedule.cross_merge_ratio=1.5': "
        "model.schedule.cross_merge_ratio: cross_merge_ratio=1.5 is outside [0, 1): it is the fraction merged "
        "(retained ratio -0.5 must lie in (0, 1])\n")
    # Unset paths are named as unset (an empty path would otherwise pass as the working directory).
    assert main(["eval", "--config", str(run_config), "data.anno_path=''"]) == 2
    assert "data.anno_path: not set" in capsys.readouterr().err
    assert main(["eval", "--config", str(run_config), "data.video_dir=''"]) == 2
    assert "data.video_dir: not set" in capsys.readouterr().err
    strict = ["train", "--config", str(run_config), "data.strict=true", "--output", str(tmp_path)]
    assert main(strict) == 2
    assert f"{MISSING}.mp4" in capsys.readouterr().err
    # The setting that is wrong, not the one a later check happened to read.
    assert main(["train", "--config", str(run_config), "data.max_words=100", "--output", str(tmp_path)]) == 2
    assert ("command-line override 'data.max_words=100': data.max_words: CLIP's text encoder reads at most 77 "
            "tokens") in capsys.readouterr().err
    assert main(["train", "--config", str(run_config), "data.val_split=dev", "--output", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "command-line override 'data.val_split=dev': data.val_split: " in error
    assert "or data.val_split=holdout with data.holdout_videos=N to validate on N training videos held out" in error
    assert main(["eval", "--config", str(run_config), "--split", "bogus", "--no-cache"]) == 2
    assert "tempme eval: error: command line: --split: " in capsys.readouterr().err
    ablation = ["train", "--config", str(run_config), "model.method=none", "model.schedule.tome_r=3",
                "--output", str(tmp_path / "ablation")]
    assert main(ablation) == 2
    assert ("command-line override 'model.schedule.tome_r=3': model.schedule.tome_r: no effect with "
            "model.method=none, set by command-line override 'model.method=none'") in capsys.readouterr().err


# --- bad input and unusable places fail in one line, before the work ---------------------------


def custom_captions(path: Path, video_ids: list[str], videos: Path) -> Path:
    """A custom-format CSV of the fixture's clips (absolute paths), one caption each."""
    rows = [f"{videos / vid}.mp4,clip {i} of a {['red', 'blue', 'green'][i % 3]} scene" for i, vid in enumerate(video_ids)]
    path.write_text("video,caption\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def custom_run(run_config, tmp_path_factory) -> tuple[Path, Path]:
    """A short run on custom data validated on its own training pairs: (annotation file, run folder)."""
    root = tmp_path_factory.mktemp("custom")
    good = [vid for vid in TRAIN_IDS if vid not in (CORRUPT, MISSING)]
    captions = custom_captions(root / "captions.csv", good, run_config.parent / "videos")
    output = root / "run"
    command = ["train", "--config", str(run_config), "data.dataset=custom", f"data.anno_path={captions}",
               "data.val_split=val", "optim.epochs=1", "--output", str(output)]
    with pytest.warns(UserWarning, match=f"validation reads the training pairs of {captions}"):
        assert main(command) == 0
    return captions, output


def one_error_line(capsys) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    return error


def test_a_caption_length_out_of_range_names_data_max_words_wherever_the_model_comes_from(
        run_config, custom_run, tmp_path, capsys):
    from tempme.weights import save_weights

    weights = save_weights(tempme.create_model(PRESET, frames=4), tmp_path / "base.safetensors")
    reason = "data.max_words: must be at least 3: room for the start and end tokens and one word of the caption"
    for words in (1, 2):
        for model in ("model.weights=null", f"model.weights={weights}"):
            assert main(["train", "--config", str(run_config), model, f"data.max_words={words}",
                         "--output", str(tmp_path / "run")]) == 2
            told = one_error_line(capsys)
            assert told == f"tempme train: error: command-line override 'data.max_words={words}': {reason} (got {words})\n"
    assert main(["eval", "--checkpoint", str(custom_run[1]), "data.max_words=1", "--no-cache"]) == 2
    assert one_error_line(capsys) == f"tempme eval: error: command-line override 'data.max_words=1': {reason} (got 1)\n"


def test_strict_runs_stop_on_an_undecodable_video_with_one_line(run_config, tmp_path, capsys):
    videos = run_config.parent / "videos"
    # The four training videos fill the one batch of an epoch, so the first step reads the corrupt one.
    captions = custom_captions(tmp_path / "captions.csv", ["video0", "video1", CORRUPT, "video3", "video4"], videos)
    # No loader workers: an abandoned worker takes torch 5 s to stop (the worker path is checked in
    # test_data_dataset.py).
    custom = [f"data.anno_path={captions}", "data.dataset=custom", "data.holdout_videos=1", "data.strict=true",
              "data.num_workers=0"]
    assert main(["train", "--config", str(run_config), *custom, "--output", str(tmp_path / "run")]) == 2
    error = one_error_line(capsys)
    assert f"cannot decode video {videos / CORRUPT}.mp4: unreadable container" in error
    assert main(["eval", "--config", str(run_config), *custom, "--no-cache", "--json"]) == 2  # --json: no bars
    assert f"{CORRUPT}.mp4: unreadable container" in one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_only_torch_is_one_line(run_config, tmp_path, capsys):
    assert main(["train", "--config", str(run_config), "run.device=cuda", "--output", str(tmp_path / "run")]) == 2
    assert "run.device: CUDA is not available" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()
    assert main(["eval", "--config", str(run_config), "--device", "cuda:1"]) == 2
    assert "run.device: CUDA is not available" in one_error_line(capsys)


def test_unusable_output_and_cache_folders(run_config, tmp_path, capsys, monkeypatch):
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    assert main(["train", "--config", str(run_config), "--output", str(taken)]) == 2
    assert f"--output {taken}: exists and is not a folder" in one_error_line(capsys)
    assert main(["train", "--config", str(run_config), f"run.output_dir={taken / 'run'}"]) == 2
    assert f"command-line override 'run.output_dir={taken / 'run'}': run.output_dir {taken / 'run'}: " \
        "cannot be created" in one_error_line(capsys)
    assert main(["eval", "--config", str(run_config), "--cache-dir", str(taken)]) == 2
    assert f"--cache-dir {taken}" in one_error_line(capsys)
    # The default cache cannot be written: the metrics still come, with a warning.
    monkeypatch.setenv("TEMPME_CACHE", str(taken / "cache"))
    with pytest.warns(UserWarning, match="could not write the embedding cache"):
        assert main(["eval", "--config", str(run_config), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["num_videos"] == 3 and "R1" in results["t2v"] and results["cache"] is None


def test_custom_eval_on_the_training_file_says_the_numbers_are_training_pairs(custom_run, capsys):
    captions, output = custom_run
    with pytest.warns(UserWarning, match="measure fit to the training pairs"):
        assert main(["eval", "--checkpoint", str(output), "--json", "--no-cache"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert str(captions) in results["warning"] and results["num_videos"] == len(TRAIN_IDS) - 2  # all good ones


def test_custom_eval_on_videos_trained_on_warns_whatever_the_file(custom_run, run_config, tmp_path, capsys):
    captions, output = custom_run
    videos = run_config.parent / "videos"

    def evaluate(ids: list[str]) -> dict:
        path = custom_captions(tmp_path / f"{len(ids)}.csv", ids, videos)
        assert main(["eval", "--checkpoint", str(output), "--anno-path", str(path), "--json", "--no-cache"]) == 0
        return json.loads(capsys.readouterr().out)

    copy = tmp_path / "copy.csv"  # the training file under another name
    copy.write_text(captions.read_text())
    with pytest.warns(UserWarning, match=r"all the 8 videos evaluated \(.*copy.csv\) were trained on by "):
        assert main(["eval", "--checkpoint", str(output), "--anno-path", str(copy), "--json", "--no-cache"]) == 0
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"2 of the 5 videos evaluated .* were trained on"):
        evaluate(["video0", "video1", *TEST_IDS])
    assert "warning" not in evaluate(TEST_IDS)  # other videos: a real test, no warning


def test_checkpoint_adapters_go_only_on_their_own_base_weights(custom_run, tmp_path, capsys):
    from tempme.weights import save_weights

    _, output = custom_run
    config = train_config_of(output / "best.safetensors")
    base = build_model(config)  # the seeded random backbone the run trained on
    save_weights(base, tmp_path / "base.safetensors")
    with torch.no_grad():
        next(p for name, p in base.named_parameters() if "lora" not in name).add_(0.5)
    save_weights(base, tmp_path / "other.safetensors")

    evaluate = ["eval", "--checkpoint", str(output), "--json", "--no-cache", "--split", "val"]
    assert main([*evaluate, "--weights", str(tmp_path / "other.safetensors")]) == 2
    error = one_error_line(capsys)
    assert "other.safetensors" in error and "trained on the random" in error
    # The same weights from a file are accepted, give the same numbers and are named in the report.
    assert main(evaluate) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*evaluate, "--weights", str(tmp_path / "base.safetensors")]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert moved["t2v"] == plain["t2v"] and moved["base_weights"] == str(tmp_path / "base.safetensors")


def test_a_validation_set_with_every_video_missing_fails_before_training(run_config, tmp_path, capsys):
    videos = run_config.parent / "videos"
    # The held-out video is the last one of the file, and it is the missing one.
    captions = custom_captions(tmp_path / "captions.csv", ["video0", "video1", "video3", "video4", MISSING], videos)
    command = ["train", "--config", str(run_config), f"data.anno_path={captions}", "data.dataset=custom",
               "data.holdout_videos=1", "data.num_workers=0", "--output", str(tmp_path / "run")]
    with pytest.warns(UserWarning, match=MISSING):
        assert main(command) == 2
    error = one_error_line(capsys)
    assert "data.holdout_videos" in error and "nothing to validate on" in error and str(captions) in error
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_trained_run_loads_from_python_on_its_base_weights(custom_run, tmp_path):
    from tempme.weights import load_weights, save_weights
    from tempme_train.modeling import load_trained_model

    _, done = custom_run
    with pytest.raises(ValueError, match=r"best.safetensors: this is an adapters-only checkpoint: a tempme train run's "
                       r"loads on its base weights with --checkpoint \(from Python: "
                       r"tempme_train.modeling.load_trained_model\(run\)\)"):
        tempme.load_model(done / "best.safetensors")  # the library's loader wants every weight
    trained = load_weights(done / "best.safetensors").state_dict
    model = load_trained_model(done)
    assert not model.training and model.config.merge.method == "tempme"
    state = model.state_dict()
    assert trained and all(torch.equal(state[name], value) for name, value in trained.items())
    assert any(value.abs().sum() > 0 for name, value in trained.items() if "lora_b" in name)  # trained, not zeros
    other = build_model(train_config_of(done / "best.safetensors"))  # the same architecture, other weights
    with torch.no_grad():
        other.visual.proj.add_(1.0)
    save_weights(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="holds adapters trained on the random .*, not on .*other.safetensors"):
        load_trained_model(done, str(tmp_path / "other.safetensors"))


def test_a_resume_refuses_adapters_whose_base_weights_were_replaced(run_config, custom_run, tmp_path, capsys):
    from tempme.weights import save_weights

    captions, done = custom_run
    base = build_model(train_config_of(done / "best.safetensors"))
    weights = save_weights(base, tmp_path / "base.safetensors")
    output = tmp_path / "run"
    command = ["train", "--config", str(run_config), "data.dataset=custom", f"data.anno_path={captions}",
               "data.val_split=val", "optim.epochs=1", f"model.weights={weights}", "--output", str(output)]
    with pytest.warns(UserWarning, match="validation reads the training pairs"):
        assert main([*command, "run.stop_after=1"]) == 0
    capsys.readouterr()
    with torch.no_grad():  # the file at the same path now holds another backbone
        next(p for name, p in base.named_parameters() if "lora" not in name).add_(0.5)
    save_weights(base, weights)
    with pytest.warns(UserWarning, match="validation reads the training pairs"):
        assert main([*command, "run.stop_after=2", "--resume"]) == 2
    error = one_error_line(capsys)
    assert f"{output / 'last' / 'weights.safetensors'} holds adapters trained on {weights}, whose weights have changed since" in error, error


def test_an_index_of_a_checkpoint_follows_its_base_weights_when_they_move(run_config, tmp_path, capsys):
    from tempme.weights import save_weights

    import tempme

    torch.manual_seed(3)
    base = save_weights(tempme.create_model(PRESET, method="tempme", frames=4), tmp_path / "base.safetensors")
    output = tmp_path / "run"
    assert main(["train", "--config", str(run_config), f"model.weights={base}", "run.stop_after=1",
                 "run.eval_every=1", "--output", str(output)]) == LEFT_OUT
    capsys.readouterr()
    videos = [str(run_config.parent / "videos" / f"{vid}.mp4") for vid in TEST_IDS]
    index = tmp_path / "test.index"
    assert main(["index", *videos, "--checkpoint", str(output), "--out", str(index), "--device", "cpu",
                 "--workers", "0", "--json"]) == 0
    assert main(["search", str(index), "test clip number 1", "--json"]) == 0
    before = json.loads(capsys.readouterr().out.splitlines()[-1])["results"]

    moved = base.rename(tmp_path / "elsewhere.safetensors")
    assert main(["search", str(index), "test clip number 1"]) == 2
    assert (f"was trained on the base weights {base}, which are not there any more: name where they are now "
            "(--weights beside --checkpoint") in capsys.readouterr().err
    for options in (["--weights", str(moved)], ["--checkpoint", str(output), "--weights", str(moved)]):
        assert main(["search", str(index), "test clip number 1", "--json", *options]) == 0
        assert json.loads(capsys.readouterr().out)["results"] == before
    # Other base weights are refused: the adapters were trained on these.
    other = save_weights(tempme.create_model(PRESET, method="tempme", frames=4), tmp_path / "other.safetensors")
    assert main(["search", str(index), "x", "--weights", str(other)]) == 2
    assert "holds adapters trained on" in capsys.readouterr().err
    # Updating the index with the moved base records where it is now.
    assert main(["index", *videos, "--checkpoint", str(output), "--weights", str(moved), "--out", str(index),
                 "--device", "cpu", "--workers", "0", "--json"]) == 0
    capsys.readouterr()
    assert main(["search", str(index), "test clip number 1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == before
    # Named once, the base's new place is kept by later updates that name the checkpoint alone.
    write_clip(run_config.parent / "videos" / "extra.mp4", 99)
    assert main(["index", *videos, str(run_config.parent / "videos" / "extra.mp4"), "--checkpoint", str(output),
                 "--out", str(index), "--device", "cpu", "--workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 1
    (run_config.parent / "videos" / "extra.mp4").unlink()
    assert main(["index", *videos, "--checkpoint", str(output), "--out", str(index), "--device", "cpu",
                 "--workers", "0", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["removed"]) == 1

    # The checkpoint itself moved: --checkpoint says where it is now (--weights would not).
    output.rename(tmp_path / "run-moved")
    assert main(["search", str(index), "test clip number 1", "--weights", str(moved)]) == 2
    assert "was built with the trained weights at" in capsys.readouterr().err
    assert main(["search", str(index), "test clip number 1"]) == 2
    assert "name where they are now with --checkpoint" in capsys.readouterr().err
    assert main(["search", str(index), "test clip number 1", "--json", "--checkpoint", str(tmp_path / "run-moved")]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == before


def test_a_run_stopped_by_an_error_exits_with_loader_workers(run_config, tmp_path):
    # With DataLoader workers, an error (here data.strict meeting the corrupt video while training) used
    # to leave them alive past the run, and Python's exit waited on them forever.
    import os
    import shutil
    import subprocess
    import sys

    anno = shutil.copytree(run_config.parent / "anno", tmp_path / "anno")
    train_list = anno / "MSRVTT_train.9k.csv"  # without the missing video, which strict refuses up front
    train_list.write_text("".join(line for line in train_list.read_text().splitlines(keepends=True)
                                  if line.strip() != MISSING))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2] / "src"), *sys.path]))
    command = [sys.executable, "-m", "tempme_cli.main", "train", "--config", str(run_config), "data.strict=true",
               "data.num_workers=1", f"data.anno_path={anno}", "model.preset=tiny-B/32", "data.image_size=224", "--output", str(tmp_path / "run")]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 2, finished.stderr
    assert "cannot decode video" in finished.stderr and CORRUPT in finished.stderr


def test_an_unreadable_test_split_is_warned_about_before_training(run_config, tmp_path, capsys):
    import shutil

    anno = shutil.copytree(run_config.parent / "anno", tmp_path / "anno")
    (anno / "MSRVTT_JSFUSION_test.csv").unlink()
    with pytest.warns(UserWarning, match="the test split cannot be read, so `tempme eval` will fail until it is "
                      "fixed: .*data.anno_path: MSRVTT test split file not found"):
        assert main(["train", "--config", str(run_config), f"data.anno_path={anno}", "run.stop_after=1",
                     "--output", str(tmp_path / "run")]) == LEFT_OUT
