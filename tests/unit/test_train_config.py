"""Training config: loading, bundled configs, and errors that name the file, key and value."""

from pathlib import Path

import pytest

from tempme_train.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    list_configs,
    load_config,
    save_config,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_papers_recipe():
    config = load_config(None)
    optim = config.optim
    assert (optim.lr, optim.weight_decay, optim.eps, optim.betas) == (6e-4, 0.2, 1e-6, (0.9, 0.999))
    assert (optim.warmup, optim.epochs, optim.batch_size, optim.grad_clip, optim.seed) == (0.1, 5, 128, 1.0, 42)
    assert optim.precision == "fp32" and config.model.trainable == "lora"


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


def test_malformed_override_and_unknown_config_name():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["optim.lr"])
    with pytest.raises(FileNotFoundError, match="msrvtt_b32_tempme"):
        load_config("no_such_config")
