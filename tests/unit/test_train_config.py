"""Training config: loading, bundled configs, and errors that name the file, key and value."""

import os
import stat
from pathlib import Path

import pytest

from tempme_train.data import annotation_split
from tempme_train.config import (
    check_schedule_is_read,
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    list_configs,
    load_config,
    save_config,
    with_settings,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_papers_recipe():
    config = load_config(None)
    optim = config.optim
    assert (optim.lr, optim.weight_decay, optim.eps, optim.betas) == (6e-4, 0.2, 1e-6, (0.9, 0.999))
    assert (optim.warmup, optim.epochs, optim.batch_size, optim.grad_clip, optim.seed) == (0.1, 5, 128, 1.0, 42)
    assert optim.gradient_divisor == 4  # the paper's 4 GPUs averaged their gradients (SPEC section 6)
    assert optim.precision == "fp32" and config.model.trainable == "lora"


def test_a_tilde_in_a_path_setting_means_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    overrides = ["run.output_dir=~/runs/a", "data.frame_cache=~/frames", "data.video_dir=~/videos",
                 "data.anno_path=~/anno", "model.weights=~/clip.pt"]
    config = load_config(None, overrides)
    assert (config.run.output_dir, config.data.frame_cache, config.data.video_dir, config.data.anno_path,
            config.model.weights) == tuple(str(tmp_path / name) for name in ("runs/a", "frames", "videos", "anno", "clip.pt"))
    assert load_config(None, ["model.weights=ViT-B/16"]).model.weights == "ViT-B/16"  # a preset name stays


def test_the_frames_sampled_follow_the_models_frame_count_unless_both_are_given(tmp_path):
    config = load_config("msrvtt_b32_tempme", ["model.frames=8"])
    assert (config.model.frames, config.data.max_frames) == (8, 8)
    own = write(tmp_path / "own.yaml", "base: msrvtt_b32_tempme\nmodel: {frames: 6}\n")
    assert load_config(own).data.max_frames == 6
    whole = write(tmp_path / "whole.yaml", "model: {frames: 8}\n")  # a config of its own, no base
    assert load_config(whole).data.max_frames == 8
    with pytest.raises(ConfigError, match="data.max_frames: must equal model.frames"):
        load_config("msrvtt_b32_tempme", ["model.frames=8", "data.max_frames=6"])


def test_every_main_table_setting_is_bundled_and_loads():
    names = list_configs()
    for dataset, backbones in (("msrvtt", ("b32", "b16")), ("lsmdc", ("b32", "b16")), ("didemo", ("b32",)), ("activitynet", ("b32",))):
        for backbone in backbones:
            for method in ("none", "tome", "tempme"):
                assert f"{dataset}_{backbone}_{method}" in names
    for name in names:
        config = load_config(name)
        assert config.model.method in name
        assert config.data.val_split != config.data.test_split, f"{name} selects the model on its test split"
        assert config.model.frames == config.data.max_frames


def test_bundled_settings_follow_the_paper():
    b16 = load_config("msrvtt_b16_tempme")
    assert b16.model.preset == "ViT-B/16" and b16.model.method == "tempme"
    long = load_config("activitynet_b32_tempme")
    assert (long.model.frames, long.data.max_words, long.data.val_split, long.data.test_split) == (64, 64, "holdout", "val")
    msrvtt = load_config("msrvtt_b32_tempme")
    assert (msrvtt.data.val_split, msrvtt.data.holdout_videos) == ("holdout", 500)


def test_base_files_merge_and_overrides_apply(tmp_path):
    write(tmp_path / "base.yaml", "optim: {lr: 1.0e-3, epochs: 2}\nrun: {output_dir: out}\n")
    config_file = write(tmp_path / "run.yaml", "base: base.yaml\noptim: {epochs: 3}\n")
    config = load_config(config_file, ["optim.lr=6e-4", "model.schedule.clips_joined=[2, 2, 3]"])
    assert (config.optim.lr, config.optim.epochs, config.run.output_dir) == (6e-4, 3, "out")
    assert config.model.schedule.as_kwargs() == {"clips_joined": [2, 2, 3]}


def test_related_settings_can_change_together():
    config = apply_overrides(TrainConfig(), ["model.frames=64", "data.max_frames=64"])
    assert config.model.frames == config.data.max_frames == 64


def test_saved_config_loads_back_equal(tmp_path):
    config = load_config("lsmdc_b16_tome", ["optim.betas=[0.8, 0.9]"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("optim:\n  learning_rate: 0.1\n", "optim.learning_rate", "0.1"),
        ("optim:\n  lr: fast\n", "optim.lr", "'fast'"),
        ("model:\n  frames: 12.5\n", "model.frames", "12.5"),
        ("data:\n  augment: 1\n", "data.augment", "1"),
        ("optim:\n  precision: fp8\n", "optim.precision", "'fp8'"),
        ("optim:\n  betas: [0.9]\n", "optim.betas", "[0.9]"),
        ("model:\n  schedule:\n    merge_layers: [8, nine]\n", "model.schedule.merge_layers[1]", "'nine'"),
        ("trainer:\n  epochs: 1\n", "trainer", "{'epochs': 1}"),
    ],
)
def test_file_errors_name_file_key_and_value(tmp_path, text, key, value):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message and key in message and value in message
    assert caught.value.key == key


@pytest.mark.parametrize(
    "override, key",
    [("optim.lr=abc", "optim.lr"), ("optim.momentum=0.9", "optim.momentum"), ("run.tensorboard=maybe", "run.tensorboard"),
     ("data.num_workers=2.5", "data.num_workers")],
)
def test_override_errors_name_the_override(override, key):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert override in str(caught.value) and caught.value.key == key


def test_inconsistent_values_are_rejected():
    with pytest.raises(ConfigError, match="data.max_frames.*model.frames"):
        load_config(None, ["data.max_frames=13"])
    with pytest.raises(ConfigError, match="data.holdout_videos"):
        load_config(None, ["data.val_split=holdout"])
    with pytest.raises(ConfigError, match="optim.warmup"):
        load_config(None, ["optim.warmup=1.5"])


@pytest.mark.parametrize("words", [0, 1, 2, 78])
def test_a_caption_length_the_text_encoder_cannot_read_names_data_max_words_and_its_source(tmp_path, words):
    # Checked with the settings: the model's own check would be blamed on the weights it is built from.
    with pytest.raises(ConfigError) as caught:
        load_config("msrvtt_b32_tempme", [f"data.max_words={words}"])
    assert caught.value.key == "data.max_words"
    assert str(caught.value).startswith(f"command-line override 'data.max_words={words}': data.max_words: ")
    path = write(tmp_path / "short.yaml", f"base: msrvtt_b32_tempme\ndata: {{max_words: {words}}}\n")
    with pytest.raises(ConfigError, match=f"^{path}: data.max_words: "):
        load_config(path)


def test_the_shortest_caption_length_holds_one_word():
    assert load_config(None, ["data.max_words=3"]).data.max_words == 3
    with pytest.raises(ConfigError, match="data.max_words: must be at least 3: room for the start and end tokens"):
        load_config(None, ["data.max_words=2"])


@pytest.mark.parametrize(
    "config, split, read",
    [("activitynet_b32_tempme", "test", "val_1"), ("activitynet_b32_tempme", "val", "500 videos held out of train"),
     ("activitynet_b32_tempme", "val_1", "val_1"), ("msrvtt_b32_tempme", "test", "test"),
     ("msrvtt_b32_tempme", "val", "500 videos held out of train9k"), ("msrvtt_b32_tempme", "train7k", "train7k"),
     ("didemo_b32_tempme", "val", "val"), ("lsmdc_b32_tempme", "test", "test")],
)
def test_the_annotations_an_evaluated_split_reads_are_named_in_the_datasets_words(config, split, read):
    assert annotation_split(load_config(config).data, split) == read


def test_a_custom_file_is_every_split_and_one_held_out_video_is_singular():
    data = load_config(None, ["data.dataset=custom", "data.anno_path=/data/captions.csv", "data.val_split=holdout",
                              "data.holdout_videos=1"]).data
    assert [annotation_split(data, split) for split in ("test", "val")] == [
        "captions.csv", "1 video held out of captions.csv"]


def test_malformed_override_and_unknown_config_name():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["optim.lr"])
    with pytest.raises(FileNotFoundError, match="msrvtt_b32_tempme"):
        load_config("no_such_config")


def test_saved_config_gets_the_mode_of_a_plain_write_and_keeps_a_changed_one(tmp_path):
    previous = os.umask(0o027)
    try:
        path = tmp_path / "config.yaml"
        save_config(TrainConfig(), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 less the umask
        path.chmod(0o644)
        save_config(TrainConfig(), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(previous)


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    path = write(tmp_path / "run.yaml", "optim:\n  lr: 1.0e-3\n epochs: 2\n")  # epochs indented by one space
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: invalid YAML at line 3, column 2: ")
    assert "expected <block end>" in message  # PyYAML's name for the problem


def test_a_control_character_is_placed_by_line_and_column(tmp_path):
    path = write(tmp_path / "run.yaml", "optim:\n  lr: 1\x00\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: invalid YAML at line 2, column 8: character #x0000 ")


def test_an_override_with_a_yaml_syntax_error_is_one_line():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["model.schedule.merge_layers=[8, 9"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("command-line override 'model.schedule.merge_layers=[8, 9': model.schedule.merge_layers: ")
    # The sequence is still open where the text ends, after its 5th character.
    assert "invalid YAML at line 1, column 6: " in message and message.endswith("(got '[8, 9')")


def test_a_config_that_is_not_utf8_text_is_named(tmp_path):
    path = tmp_path / "some.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42\n\xcf\x80\xff")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: not UTF-8 text (byte 0xff on line 2); a config is a YAML text file"


def test_an_error_in_a_base_file_names_the_base_file(tmp_path):
    base = write(tmp_path / "base.yaml", "optim:\n  lr: fast\n")
    write(tmp_path / "run.yaml", "base: base.yaml\noptim:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "run.yaml")
    assert str(caught.value) == f"{base}: optim.lr: expected a number (got 'fast')"


def test_a_check_across_settings_names_the_override_that_set_each_value(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["optim.lr=1e-4", "data.max_frames=13"])
    assert str(caught.value).startswith("command-line override 'data.max_frames=13': data.max_frames: ")
    assert "optim.lr" not in str(caught.value)  # not all overrides: the one that set the bad value
    path = write(tmp_path / "run.yaml", "model:\n  frames: 12\ndata:\n  max_frames: 12\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["data.max_frames=16"])
    assert str(caught.value) == (
        f"command-line override 'data.max_frames=16': data.max_frames: must equal model.frames (12, set by {path}): "
        "the merge schedule is built for that many frames (got 16)"
    )


def test_a_config_knows_which_source_set_each_value(tmp_path):
    path = write(tmp_path / "run.yaml", "model:\n  frames: 12\n  schedule:\n    tome_r: 2\n")
    config = load_config(path, ["model.schedule.merge_layers=[20]", "optim.lr=1e-4"])
    config = with_settings(config, {"run.output_dir": "out"}, "--output")
    override = "command-line override 'model.schedule.merge_layers=[20]'"
    assert config.source_of("model.schedule.merge_layers") == config.source_of("model.schedule.merge_layers[0]") == override
    assert config.source_of("model.schedule.tome_r") == config.source_of("model.frames") == str(path)
    assert config.source_of("model.schedule") == f"{path} and {override}"  # both set part of it
    assert config.source_of("optim.lr") == "command-line override 'optim.lr=1e-4'"
    assert config.source_of("run.output_dir") == "--output"
    assert config.source_of("optim.epochs") == str(path)  # a default: blamed on the config file
    # A later check that only knows the file blames the override that set the value it names.
    error = ConfigError(str(path), "model.schedule.merge_layers", [20], "merge layer 20 is out of range")
    assert str(config.blame(error)) == f"{override}: model.schedule.merge_layers: merge layer 20 is out of range (got [20])"
    error = ConfigError(str(path), "model.frames", 12, "too few")
    assert config.blame(error) is error
    # The record is no setting: not saved, not compared.
    assert config == load_config(path, ["model.schedule.merge_layers=[20]", "optim.lr=1e-4", "run.output_dir=out"])
    assert "origins" not in config.to_dict()


def test_options_are_blamed_only_for_their_own_values(tmp_path):
    path = write(tmp_path / "run.yaml", "model:\n  frames: 12\n")
    config = load_config(path)
    with pytest.raises(ConfigError) as caught:
        with_settings(config, {"model.frames": 0, "data.max_frames": 0}, "--frames")
    assert str(caught.value) == "--frames: model.frames: must be positive (got 0)"
    with pytest.raises(ConfigError) as caught:
        with_settings(config, {"model.frames": 16}, "--frames")
    assert str(caught.value).startswith(f"{path}: data.max_frames: must equal model.frames (16, set by --frames)")


def test_an_error_may_leave_out_the_value_when_its_reason_shows_it():
    reason = "bad train annotations: /a/MSRVTT_data.json: field 'sentences[0].caption': expected a string (got 5)"
    error = ConfigError("run.yaml", "data.anno_path", "/a", reason, show_value=False)
    assert str(error) == f"run.yaml: data.anno_path: {reason}"
    assert str(ConfigError("run.yaml", None, None, "cannot read (Permission denied)", show_value=False)) == (
        "run.yaml: cannot read (Permission denied)"
    )


@pytest.mark.parametrize("override", ["optim.lr=.inf", "optim.lr=.nan", "optim.lr=1e999", "optim.grad_clip=.inf",
                                      "data.framerate=-.inf"])
def test_non_finite_numbers_are_refused(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert caught.value.key == key and "expected a finite number" in str(caught.value)
    assert str(caught.value).startswith(f"command-line override '{override}': {key}: ")


def test_frames_whose_batch_cannot_fit_in_memory_are_refused_naming_data_max_frames(monkeypatch):
    import tempme.data.dataset as dataset

    settings = {"model": {"frames": 12}, "data": {"max_frames": 12}, "optim": {"batch_size": 8},
                "run": {"eval_batch_size": 4}}
    config_from_dict(settings, "run.yaml")  # 8 x 12 x 3 x 224 x 224 x 4 bytes: 55 MiB
    monkeypatch.setattr(dataset, "physical_memory", lambda: 50 * 2**20)
    with pytest.raises(ValueError, match="run.yaml: data.max_frames: 12 frames of 224x224 pixels for each of 8 "
                                         "videos take 55 MiB as one batch, more than this machine's 50 MiB"):
        config_from_dict(settings, "run.yaml")
    monkeypatch.setenv("WORLD_SIZE", "2")  # each process decodes 4 training videos, as for evaluation: 28 MiB
    config_from_dict(settings, "run.yaml")


@pytest.mark.parametrize(
    "name, override, setting",
    [("msrvtt_b32_none", "model.schedule.tome_r=3", "tome_r"),
     ("msrvtt_b32_tome", "model.schedule.merge_layers=[6, 8, 10]", "merge_layers"),
     ("msrvtt_b32_tome", "model.schedule.cross_merge_ratio=0.5", "cross_merge_ratio")],
)
def test_an_ablation_the_method_ignores_is_refused(name, override, setting):
    """It would train the same model as without the setting while config.yaml recorded the ablation.
    Such a config still loads (runs trained before the check store theirs); training refuses it."""
    config = load_config(name, [override])
    with pytest.raises(ConfigError, match=rf"command-line override .*: model\.schedule\.{setting}: no effect with "
                                          rf"model\.method=(none|tome), set by .*{name}"):
        check_schedule_is_read(config, name)
    check_schedule_is_read(load_config(name.replace("_none", "_tempme").replace("_tome", "_tempme"), [override]), name)


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a second model section would silently drop the first."""
    path = tmp_path / "twice.yaml"
    path.write_text("model:\n  frames: 12\noptim:\n  lr: 1.0e-4\nmodel:\n  lora_rank: 4\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: invalid YAML at line 5, column 1: 'model' is given twice "
                                          r"\(first on line 1\)"):
        load_config(path)
    path.write_text("optim:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError, match="'lr' is given twice"):
        load_config(path)


def test_base_may_name_a_bundled_config(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: msrvtt_b32_tome\noptim:\n  epochs: 1\n")
    config = load_config(path)
    assert config.model.method == "tome" and config.optim.epochs == 1
    assert config.optim.lr == load_config("msrvtt_b32_tome").optim.lr
    path.write_text("base: msrvtt_b32_tomee\n")
    with pytest.raises(ConfigError, match="file not found: .*msrvtt_b32_tomee .*or a bundled config: .*msrvtt_b32_tome"):
        load_config(path)


def test_yaml_anchors_and_merge_keys_still_load(tmp_path):
    """The check for keys given twice must leave YAML's own merge key (<<) alone."""
    path = tmp_path / "anchors.yaml"
    path.write_text("optim: &opt\n  lr: 1.0e-4\n  epochs: 2\nrun:\n  output_dir: runs/x\n"
                    "paper: {}\n")
    load_config(path)
    path.write_text("defaults: &d {lr: 1.0e-4}\n")  # an unknown section: still refused as before
    with pytest.raises(ConfigError, match="defaults"):
        load_config(path)
    path.write_text("optim:\n  <<: {lr: 1.0e-4, epochs: 2}\n  epochs: 3\n")
    config = load_config(path)
    assert (config.optim.lr, config.optim.epochs) == (1.0e-4, 3)


def test_missing_videos_under_strict_name_the_video_folder_setting(tmp_path):
    from tempme.data import VideoItem
    from tempme_train.config import DataSettings
    from tempme_train.data import drop_missing_videos

    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "b.mp4").write_bytes(b"video")
    items = [VideoItem("a", tmp_path / "clips" / "a.mp4"), VideoItem("b", tmp_path / "clips" / "b.mp4")]
    data = DataSettings(video_dir=str(tmp_path), strict=True)
    with pytest.raises(ConfigError, match=rf"data.video_dir: 1 of 2 training videos are missing: .*a.mp4 \(got '{tmp_path}'\)"):
        drop_missing_videos(items, data, "training", "run.yaml")


@pytest.mark.parametrize("dataset", ["custom", "msrvtt"])
def test_a_video_folder_that_holds_none_of_the_videos_is_named(tmp_path, dataset):
    """Not one video there: most likely the wrong folder, an error even without data.strict."""
    from tempme.data import VideoItem
    from tempme_train.config import DataSettings
    from tempme_train.data import drop_missing_videos

    items = [VideoItem(name, tmp_path / f"{name}.mp4") for name in ("a", "b")]
    data = DataSettings(dataset=dataset, video_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="data.video_dir: 2 of 2 test videos are missing: .*a.mp4, .*b.mp4; ") as info:
        drop_missing_videos(items, data, "test", "run.yaml")
    hint = "relative to data.video_dir, or to the annotation file's folder" if dataset == "custom" else "must hold the msrvtt videos"
    assert hint in str(info.value)


def test_every_schedule_setting_is_an_override_and_a_flops_option():
    """The merge schedule's settings are listed in the library's MergeConfig, the training config's
    ScheduleOverrides and the options of `tempme flops`: a setting added to one must reach the others."""
    import argparse
    import dataclasses

    from tempme.config import MergeConfig
    from tempme_cli.common import add_schedule_arguments, schedule_overrides
    from tempme_train.config import ScheduleOverrides

    settings = {field.name for field in dataclasses.fields(MergeConfig)} - {"method"}
    assert {field.name for field in dataclasses.fields(ScheduleOverrides)} == settings
    parser = argparse.ArgumentParser()
    add_schedule_arguments(parser)
    args = parser.parse_args(["--tome-r", "3", "--merge-layers", "6-8", "--clips-joined", "3-4",
                              "--cross-merge-ratio", "0.5", "--intra-merge-ratio", "0.2",
                              "--no-clip-pos-embed", "--no-prop-attn"])
    assert schedule_overrides(args) == {"tome_r": 3, "merge_layers": (6, 8), "clips_joined": (3, 4),
                                        "cross_merge_ratio": 0.5, "intra_merge_ratio": 0.2,
                                        "clip_pos_embed": False, "prop_attn": False}
    assert set(schedule_overrides(args)) == settings


@pytest.mark.parametrize("dataset", ["custom", "msrvtt"])
def test_a_video_folder_that_is_not_there_is_refused_before_the_annotations_are_read(tmp_path, dataset):
    from tempme_train.config import DataSettings
    from tempme_train.data import load_split

    (tmp_path / "captions.csv").write_text("video,caption\na.mp4,a red square\n")
    data = DataSettings(dataset=dataset, anno_path=str(tmp_path / "captions.csv"), video_dir=str(tmp_path / "nodirhere"))
    with pytest.raises(ConfigError, match=r"data.video_dir: no such folder.* \(got '.*nodirhere'\)"):
        load_split(data, "train", "run.yaml")


def test_a_training_set_smaller_than_one_batch_names_the_batch_size_and_who_set_it(tmp_path):
    from tempme_train.config import config_from_dict
    from tempme_train.data import prepare_training_data

    for name in ("a", "b"):
        (tmp_path / f"{name}.mp4").write_bytes(b"not decoded here")
    (tmp_path / "captions.csv").write_text("video,caption\na.mp4,a red square\nb.mp4,a blue circle\nb.mp4,a circle\n")
    data = {"dataset": "custom", "anno_path": str(tmp_path / "captions.csv"), "val_split": "none"}
    config = apply_overrides(config_from_dict({"data": data}, "run.yaml"), ["optim.batch_size=4"])
    with pytest.raises(ConfigError, match=r"^command-line override 'optim.batch_size=4': optim.batch_size: the "
                       r"training set has 3 \(video, caption\) pairs, fewer than one global batch"):
        prepare_training_data(config, "run.yaml")


def test_a_video_missing_from_training_and_validation_is_listed_once(tmp_path):
    from tempme_train.config import config_from_dict
    from tempme_train.data import prepare_training_data

    (tmp_path / "a.mp4").write_bytes(b"not decoded here")
    (tmp_path / "captions.csv").write_text("video,caption\na.mp4,a red square\ngone.mp4,a blue circle\n")
    data = {"dataset": "custom", "anno_path": str(tmp_path / "captions.csv"), "val_split": "test"}
    config = config_from_dict({"data": data, "optim": {"batch_size": 1}}, "run.yaml")
    with pytest.warns(UserWarning, match="gone.mp4"):
        prepared = prepare_training_data(config, "run.yaml")
    assert prepared.missing_videos == ["gone.mp4"]  # its video id, once


def test_an_empty_string_setting_from_the_command_line_or_yaml_is_empty(tmp_path):
    config = apply_overrides(TrainConfig(), ["data.video_dir=", "data.anno_path=captions.csv"])
    assert config.data.video_dir == ""
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  video_dir:\n")
    assert load_config(path).data.video_dir == ""


def test_a_small_validation_set_is_warned_about(tmp_path):
    from tempme_train.config import config_from_dict
    from tempme_train.data import prepare_training_data

    rows = ["video,caption"]
    for i in range(6):
        (tmp_path / f"v{i}.mp4").write_bytes(b"not decoded here")
        rows.append(f"v{i}.mp4,clip {i}")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    data = {"dataset": "custom", "anno_path": str(tmp_path / "captions.csv"), "val_split": "holdout", "holdout_videos": 2}
    config = config_from_dict({"data": data, "optim": {"batch_size": 2}}, "run.yaml")
    with pytest.warns(UserWarning, match=r"validation has 2 captions \(the held-out videos\): its text-to-video R@1 "
                      r"moves in steps of 50%.*validate on more videos \(data.holdout_videos\)"):
        prepare_training_data(config, "run.yaml")


def test_a_bad_value_is_shown_without_writing_it_all_out():
    # YAML aliases make a value of a few lines as long as one likes once written out in full.
    from tempme_train.config import _short_repr

    written = []

    class Leaf:
        def __repr__(self):
            written.append(1)
            return "leaf"

    shown = _short_repr({"levels": [[Leaf()] * 100] * 100})
    assert shown.startswith("{'levels': [[leaf, leaf") and len(shown) <= 80 and len(written) < 100


def test_an_override_yaml_would_cut_short_is_refused():
    # "run #5" as YAML is "run": the run would go to another folder without a word.
    with pytest.raises(ConfigError, match=r"run.output_dir: YAML reads ' #' as the start of a comment and would "
                                          r"drop the rest: quote the value \(run.output_dir='...'\)"):
        load_config(None, ["run.output_dir=/tmp/run #5"])
    with pytest.raises(ConfigError, match="data.video_dir: YAML reads this path as a dict"):
        load_config(None, ["data.video_dir=/data/clips: 2020"])
    assert load_config(None, ["run.output_dir='/tmp/run #5'"]).run.output_dir == "/tmp/run #5"
    assert load_config(None, ["run.output_dir=/tmp/run#5"]).run.output_dir == "/tmp/run#5"  # no comment there
