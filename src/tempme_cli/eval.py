"""``tempme eval``: text-video retrieval metrics of a trained checkpoint or of plain CLIP weights."""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
import warnings
from pathlib import Path
from typing import Any

from tempme.config import MERGE_METHODS
from tempme_train.config import ConfigError, TrainConfig, apply_overrides, flat_settings, load_config, with_settings

from .common import ParagraphHelpFormatter, count, exit_status_help, finished, show_progress, user_path

WHAT_IS_EVALUATED = {
    "--checkpoint PATH": "a trained run: its folder (best.safetensors; weights.safetensors after "
    "data.val_split=none), a checkpoint folder (last/) or a weights file written by tempme train. Adapters "
    "are applied on top of the base weights named in the training config stored with them; --weights may "
    "give those same weights from another place (other weights are refused).",
    "--weights W": "CLIP or tempme weights (a file or a preset name such as ViT-B/32): zero-shot.",
    "--config CONFIG": "the model and data of a training config: zero-shot on its model.weights unless "
    "--checkpoint is given too. With a checkpoint of tempme train, the model is the one trained (its model "
    "settings, base weights, frames and image size; a warning names those CONFIG sets otherwise), and CONFIG "
    "gives the data, run and optim settings. To evaluate the adapters in another model, give model settings "
    "as KEY=VALUE.",
}

EPILOG = "what is evaluated:\n" + "\n".join(
    textwrap.fill(text, 78, initial_indent=f"  {option:<20}", subsequent_indent=" " * 22)
    for option, text in WHAT_IS_EVALUATED.items()
) + textwrap.dedent(
    """

    examples:
      tempme eval --checkpoint runs/msrvtt_b32_tempme
      tempme eval --checkpoint runs/msrvtt_b32_tempme data.anno_path=/data/anno \\
          data.video_dir=/data/videos
      tempme eval --weights ViT-B/32 --dataset msrvtt --anno-path /data/anno \\
          --video-dir /data/videos --json
      torchrun --nproc_per_node 4 -m tempme_cli.main eval --checkpoint runs/msrvtt_b32_tempme
          (each GPU embeds a quarter of the split; rank 0 prints the metrics)

    """
) + exit_status_help("missing or undecodable videos", torchrun=True)


def register(subparsers) -> None:
    from .train import add_config_arguments

    parser = subparsers.add_parser(
        "eval",
        help="retrieval metrics (R@1/5/10/50, MdR, MnR, RSum) on a benchmark split",
        description="Embed every caption and video of a split and report text-to-video and video-to-text "
        "retrieval metrics. Embeddings are cached on disk, keyed by a hash of the weights, the model config "
        "and the data (each video file's path, size and modification time included, so a changed video is "
        "embedded again), and reused when present. The videos embedded so far are kept beside the cache every "
        "minute and when the run stops: run the same command again to carry on from there.",
        epilog=EPILOG,
        formatter_class=ParagraphHelpFormatter,
    )
    add_config_arguments(parser, required=False, example="data.num_workers=8 run.eval_batch_size=64")
    parser.add_argument("--checkpoint", metavar="PATH", type=user_path, help="trained run folder, checkpoint folder or weights file")
    parser.add_argument("--weights", metavar="W", help="CLIP/tempme weights file or preset name (sets model.weights)")
    parser.add_argument("--dataset", help="msrvtt, didemo, activitynet, lsmdc or custom (sets data.dataset; a "
                        "benchmark other than the checkpoint's takes that benchmark's bundled splits, caption "
                        "length and default data paths; zero-shot weights take its whole bundled config, "
                        "frames too)")
    parser.add_argument("--anno-path", metavar="PATH", type=user_path, help="annotation folder or file (sets data.anno_path)")
    parser.add_argument("--video-dir", metavar="DIR", type=user_path, help="video folder (sets data.video_dir)")
    parser.add_argument("--method", choices=MERGE_METHODS, help="merging method (sets model.method; another than the "
                        "config's or checkpoint's takes the paper's schedule for it, as tempme flops does)")
    parser.add_argument("--frames", type=int, help="frames per video (sets model.frames and data.max_frames)")
    parser.add_argument("--split", default="test",
                        help="test: the config's test split (MSRVTT 1k-A, DiDeMo test, ActivityNet val_1, LSMDC test); "
                        "val: its validation set (held-out training videos where the dataset has none); or a "
                        "split name of the dataset (default: test). The output names the annotations read where "
                        "they differ from SPLIT: activitynet test (val_1), msrvtt val (500 videos held out of train9k)")
    parser.add_argument("--batch-size", type=int, help="videos per forward pass (default: run.eval_batch_size)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... or mps (default: run.device, which is auto "
                        "unless the config says otherwise: a CUDA GPU where there is one, else the CPU)")
    parser.add_argument("--cache-dir", metavar="DIR", type=user_path, help="embedding cache (default: embeddings/ in $TEMPME_CACHE, else in ~/.cache/tempme)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached embeddings")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(handler=run)


# The config setting each option sets, and the option's name for errors about it.
OPTION_SETTINGS = {
    "model.weights": ("weights", "--weights"),
    "model.method": ("method", "--method"),
    "data.dataset": ("dataset", "--dataset"),
    "data.anno_path": ("anno_path", "--anno-path"),
    "data.video_dir": ("video_dir", "--video-dir"),
    "model.frames": ("frames", "--frames"),
    "data.max_frames": ("frames", "--frames"),
    "run.eval_batch_size": ("batch_size", "--batch-size"),
    "run.device": ("device", "--device"),
}


def option_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Config settings given as options (applied before the KEY=VALUE overrides)."""
    settings = {key: getattr(args, name) for key, (name, _) in OPTION_SETTINGS.items()}
    return {key: value for key, value in settings.items() if value is not None}


def option_sources(settings: dict[str, Any]) -> dict[str, str]:
    """Where each of ``settings`` came from, for errors: the option, else the command line."""
    return {key: OPTION_SETTINGS[key][1] if key in OPTION_SETTINGS else "command-line options" for key in settings}


DATASET_BASES = {"msrvtt": "_msrvtt", "didemo": "_didemo", "activitynet": "_activitynet", "lsmdc": "_lsmdc"}


def resolve_config(args: argparse.Namespace, trained: Path | None, stored: TrainConfig | None) -> TrainConfig:
    """--config, else the config stored with the checkpoint (with the files, splits and words of
    --dataset where it names another benchmark), else the bundled settings of --dataset (its frames,
    words and splits: 64 for DiDeMo and ActivityNet), else defaults; then options and overrides.
    --config with a checkpoint of tempme train keeps the model that was trained (see
    :func:`with_trained_model`). Zero-shot weights that record their method (a tempme checkpoint)
    keep it unless --method says. ``stored`` is the training config recorded in ``trained``, if any."""
    from tempme_train.modeling import train_config_of

    settings = option_settings(args)
    chosen = None  # --config, where a trained model's settings replace its own
    if args.config is not None:
        config = load_config(args.config)
        if stored is not None:
            chosen, config = config, with_trained_model(config, stored, trained)
    elif trained is not None:
        config = stored if stored is not None else train_config_of(trained)  # (which says why it has none)
        if args.dataset in DATASET_BASES and args.dataset != config.data.dataset:
            config = on_other_benchmark(config, args.dataset)
    else:
        config = load_config(DATASET_BASES.get(args.dataset))
        recorded = recorded_method(args.weights) if args.weights and not args.method else None
        if recorded:
            settings["model.method"] = recorded
    if args.method and args.method != config.model.method:
        # As in `tempme flops`: another method starts from the paper's schedule for it (KEY=VALUE
        # overrides change that); the one of the config was chosen for its own method.
        settings["model.schedule"] = {}
    config = apply_overrides(with_settings(config, settings, option_sources(settings)), args.overrides)
    if chosen is not None:
        replaced = settings_replaced_by_training(chosen, config, trained)
        if replaced:
            key, value = next(iter(replaced.items()))
            example = f"{key}={json.dumps(list(value) if isinstance(value, tuple) else value)}"
            warnings.warn(f"{args.config} sets {', '.join(replaced)} differently from the model {trained} was "
                          f"trained as; the trained model is evaluated (to evaluate its adapters with {args.config}'s "
                          f"values, give them as KEY=VALUE, e.g. {example})", stacklevel=1)
    return config


TRAINED_DATA_SETTINGS = ("max_frames", "image_size")  # what the model was trained to take


def with_trained_model(config: TrainConfig, trained_config: TrainConfig, trained: Path) -> TrainConfig:
    """``config`` (--config) with the model ``trained`` was trained as: its model settings (its base
    weights too: --weights names them where they moved), frames and image size."""
    model = trained_config.to_dict()["model"]
    settings = {f"model.{name}": value for name, value in model.items()}
    settings.update({f"data.{name}": getattr(trained_config.data, name) for name in TRAINED_DATA_SETTINGS})
    if not trained_config.model.weights:  # a random backbone, drawn from the run's seed
        settings["optim.seed"] = trained_config.optim.seed
    return with_settings(config, settings, trained_source(trained))


def trained_source(trained: Path) -> str:
    return f"the training config stored in {trained}"


def settings_replaced_by_training(chosen: TrainConfig, final: TrainConfig, trained: Path) -> dict[str, Any]:
    """The model settings of ``chosen`` (--config) that the trained model's replaced in ``final``, and
    that no option or override set, with ``chosen``'s values: schedules compared as the model builds
    them, so that the paper's value written out is no difference."""
    source = trained_source(trained)
    # Both schedules on the final model's backbone, method and frames: only their settings differ.
    schedule_final = resolved_schedule(final)
    schedule_chosen = resolved_schedule(final, chosen.model.schedule.as_kwargs())
    given = flat_settings(chosen.to_dict())
    replaced = {}
    final_data = final.to_dict()
    for key, value in flat_settings({"model": final_data["model"], "data": final_data["data"]}).items():
        section, name = key.split(".", 1)
        if final.source_of(key, "") != source or (section == "data" and name not in TRAINED_DATA_SETTINGS):
            continue
        # The run's base weights, and what its file holds and fits: no other value could be evaluated.
        if key in ("model.weights", "model.trainable", "model.lora_rank", "data.image_size"):
            continue
        if key.startswith("model.schedule.") and schedule_chosen is not None and schedule_final is not None:
            setting = key.rsplit(".", 1)[1]
            if schedule_chosen.get(setting) != schedule_final.get(setting):
                replaced[key] = schedule_chosen.get(setting)
        elif given.get(key) != value:
            replaced[key] = given.get(key)
    return replaced


def resolved_schedule(config: TrainConfig, schedule: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The merge schedule ``config``'s model is built with (with ``schedule``'s settings instead of
    its own, where given), on its preset's architecture (None where that cannot be worked out without
    the weights)."""
    from tempme_train.modeling import config_on_preset, named_preset

    preset = named_preset(config)
    if preset is None or config.model.weights not in ("", None, preset):  # weights from a file: its own
        return None
    try:
        return dataclasses.asdict(config_on_preset(config, schedule).merge)
    except (TypeError, ValueError):
        return None


# What a benchmark's bundled config says about its data, apart from the frames and image size of the model.
BENCHMARK_SETTINGS = ("dataset", "anno_path", "video_dir", "train_split", "val_split", "holdout_videos", "test_split",
                      "max_words")


def on_other_benchmark(config: TrainConfig, dataset: str) -> TrainConfig:
    """A checkpoint's config evaluated on another benchmark (``--dataset``): that benchmark's files,
    splits and caption length, as its bundled config has them; the trained model stays as it is."""
    bundled = load_config(DATASET_BASES[dataset]).data
    settings = {f"data.{name}": getattr(bundled, name) for name in BENCHMARK_SETTINGS}
    return with_settings(config, settings, f"the bundled {dataset} settings (--dataset {dataset})")


def recorded_method(weights: str) -> str | None:
    """The merging method a tempme weights file records (None for other weights: presets, folders,
    OpenAI .pt files and any file that is no safetensors file, whose loading says what is wrong)."""
    from tempme.weights import WeightsError, model_config_from_metadata
    from tempme_train.modeling import recorded_metadata

    path = Path(weights).expanduser()
    if not path.is_file():
        return None
    try:
        saved = model_config_from_metadata(recorded_metadata(path))
    except WeightsError:  # a damaged model record: loading the weights says so
        return None
    return saved.merge.method if saved is not None else None


def embedding_cache(args: argparse.Namespace) -> Path | None:
    """--cache-dir, else ``embeddings/`` in the weights cache (``cache_dir()``); None with --no-cache.

    A --cache-dir that cannot be a folder (it, or a folder above it, is a file) is an error now,
    before the encoding. A read-only one still serves cached embeddings: failing to write a new file
    there is a warning (see ``tempme_train.evaluate.evaluate``), as it is for the default folder.
    """
    from tempme.weights import cache_dir
    from tempme.files import check_folder

    if args.no_cache:
        return None
    if not args.cache_dir:
        return cache_dir() / "embeddings"
    check_folder(args.cache_dir, "--cache-dir", writable=False)
    return Path(args.cache_dir)


def custom_split_warning(
    config: TrainConfig, split: str, trained: Path | None, stored: TrainConfig | None, items: list
) -> str | None:
    """A warning when a custom-format evaluation of ``items`` runs on videos the checkpoint (``trained``,
    whose training config is ``stored``) was trained on: the same annotation file (the custom format
    has no splits: every split name reads the whole file), a copy of it, or a file that shares videos
    with it. (``val`` without a held-out set is warned about where the split is built.)"""
    from tempme_train.data import train_and_val_items

    data = config.data
    if stored is None or data.dataset != "custom" or split == "val" or stored.data.dataset != "custom":
        return None
    try:
        with warnings.catch_warnings():  # about the training run's own settings, said when it ran
            warnings.simplefilter("ignore")
            trained_on = {item.path.resolve() for item in train_and_val_items(stored.data, str(trained))[0]}
    except (ConfigError, OSError):  # its annotation file moved or changed since: compare the files alone
        if Path(stored.data.anno_path).resolve() != Path(data.anno_path).resolve():
            return None
        return (f"data.dataset=custom has no {split} split: these numbers are on {data.anno_path}, the file "
                f"{trained} was trained on, so they measure fit to the training pairs, not test performance; "
                "evaluate on an annotation file of other videos (--anno-path)")
    seen = [item for item in items if item.path.resolve() in trained_on]
    if not seen:
        return None  # other videos: a real test
    which = "all" if len(seen) == len(items) else f"{len(seen)} of"
    return (f"{which} the {len(items)} videos evaluated ({data.anno_path}) were trained on by {trained} (its "
            f"training pairs are in {stored.data.anno_path}), so these numbers measure fit to the training pairs, "
            "not test performance; evaluate on an annotation file of other videos (--anno-path)")


def selected_on_test_warning(
    config: TrainConfig, split: str, trained: Path | None, stored: TrainConfig | None
) -> str | None:
    """A warning when the best weights of a run were chosen by validating on the split evaluated."""
    if stored is None or trained.name != "best.safetensors" or stored.data.val_split != stored.data.test_split:
        return None
    evaluated = {"test": config.data.test_split, "val": config.data.val_split}.get(split, split)
    if evaluated != stored.data.val_split or config.data.dataset != stored.data.dataset:
        return None
    return (f"{trained} was chosen by validating on this {evaluated} split (data.val_split={stored.data.val_split}), "
            "so these numbers were selected on it and overstate the model; report a run validated on other videos")


def run(args: argparse.Namespace) -> int:
    from tempme.config import settings_ignored_by
    from tempme.flops import count_video_flops
    from tempme.retrieval import format_metrics_table
    from tempme_train.data import annotation_split, drop_missing_videos, frame_cache, split_items
    from tempme_train.distributed import process_group, world_from_env
    from tempme_train.evaluate import EvalSet, evaluate
    from tempme_train.modeling import (
        build_model, check_base, check_weights_option, find_trained_weights, load_trained_weights, stored_config,
    )
    from tempme_train.train import run_device

    if not (args.config or args.checkpoint or args.weights):
        raise ValueError("say what to evaluate: --checkpoint PATH, --weights W or --config CONFIG")
    trained = find_trained_weights(args.checkpoint) if args.checkpoint else None
    if trained is not None and args.weights:
        check_weights_option(trained, args.weights)
    stored = stored_config(trained) if trained is not None else None  # what tempme train recorded, if it wrote it
    config = resolve_config(args, trained, stored)
    if stored is not None and stored.model.trainable == "full":
        # Every weight is in the file: it is its own base (the one trained on may have moved or gone).
        config = with_settings(config, {"model.weights": str(trained)}, trained_source(trained))
    source = args.config or str(trained or "command line")
    # Everything that can be checked without work is checked before the encoding starts.
    try:
        world = world_from_env()  # under torchrun each process embeds its share of the split
        device = run_device(config.run.device, world, source)
        cache = embedding_cache(args)
        items = split_items(config.data, args.split, source, "--split")
        items, missing = drop_missing_videos(items, config.data, args.split, source)
        warning = (custom_split_warning(config, args.split, trained, stored, items)
                   or selected_on_test_warning(config, args.split, trained, stored))
        if warning and world.is_main:  # once, not once per process
            warnings.warn(warning, stacklevel=1)
        eval_set = EvalSet.from_items(items, config.data, f"{config.data.dataset}/{args.split}", frame_cache(config.data))
        model = build_model(config, source)
    except ConfigError as error:
        # These checks know one source; the value may come from an option or a KEY=VALUE override.
        raise config.blame(error) from None
    base = config.model.weights or f"random {config.model.preset}"
    adapters = stored is not None and stored.model.trainable == "lora"  # applied on top of base
    if trained is not None:
        check_base(model, trained, base)
        load_trained_weights(model, trained)
    model.optimize_for_inference()  # the same embeddings, faster; this model is not trained further
    with process_group(device.type == "cuda"):
        results = evaluate(
            model.to(device), eval_set, config.run.eval_batch_size, device, config.optim.precision,
            config.data.num_workers, cache_dir=cache, progress=show_progress(args),
        )
    if not world.is_main:
        return 0
    merge = model.config.merge
    flops = count_video_flops(model.config)
    schedule = {name: value for name, value in dataclasses.asdict(merge).items() if name != "method"}
    ignored = settings_ignored_by(merge.method, schedule)
    results.update(
        split=args.split, annotation_split=annotation_split(config.data, args.split), dataset=config.data.dataset,
        missing=missing,
        weights=str(trained) if trained else base,
        model={"method": merge.method, "frames": model.config.frames, "precision": config.optim.precision,
               "lora_rank": model.config.lora.rank, "tokens": flops.tokens, "gflops": round(flops.gflops, 2),
               # The settings the method reads: the rest would be told apart from nothing.
               "schedule": {name: value for name, value in schedule.items() if name not in ignored}},
    )
    if config.paper.t2v or config.paper.v2t:  # figures to compare with, where a config gives them
        results["paper"] = {"t2v": config.paper.t2v, "v2t": config.paper.v2t}
    if adapters:
        results["base_weights"] = base
    if warning:
        results["warning"] = warning
    results["skipped"] = undecodable_videos(eval_set, results["skipped"])
    left_out = {"missing video": len(missing), "undecodable video": len(results["skipped"])}
    if args.json:
        print(json.dumps(results))
        return finished(args.command, left_out)
    on_base = f" (adapters on {base})" if adapters else ""
    counted = [f"{len(videos)} {label}" for label, videos in (("missing", missing), ("undecodable", results["skipped"]))
               if videos]
    left_out_text = f" ({', '.join(counted)} left out)" if counted else ""
    read = results["annotation_split"]
    label = args.split if read == args.split else f"{args.split} ({read})"
    print(f"{results['dataset']} {label}: {results['num_captions']} captions, {results['num_videos']} videos"
          f"{left_out_text}; weights: {results['weights']}{on_base}")
    print(f"model: {merge.method}, {model.config.frames} frames, LoRA rank {model.config.lora.rank}, "
          f"{config.optim.precision}; video encoder: {flops.tokens} tokens, {flops.gflops:.1f} GFLOPs per video")
    print(format_metrics_table(results["t2v"], results["v2t"]))
    if config.paper.t2v:
        print("paper t2v: " + ", ".join(f"{key} {value}" for key, value in config.paper.t2v.items()))
    if missing:
        print(f"{count(len(missing), 'missing video')}: {', '.join(missing)}")
    if results["skipped"]:
        undecodable = ", ".join(f"{video['video']} ({video['reason']})" for video in results["skipped"])
        print(f"{count(len(results['skipped']), 'undecodable video')} (left out): {undecodable}")
    return finished(args.command, left_out)


def undecodable_videos(eval_set, video_ids: list[str]) -> list[dict[str, str]]:
    """The videos of ``eval_set`` that ``evaluate`` left out as undecodable, as ``{"video", "path",
    "reason"}`` (the shape of ``skipped`` in every --json): each decoded again for its reason, which
    the embeddings, computed now or read from the cache, do not keep."""
    from tempme.data import SkippedVideo

    rows = {video: row for row, video in enumerate(eval_set.video_ids)}
    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "skipping video ...": it was left out already
        for video in video_ids:
            sample = eval_set.videos[rows[video]]
            reason = (sample.reason if isinstance(sample, SkippedVideo)
                      else "could not be decoded when it was embedded, but decodes now (changed since?)")
            records.append({"video": video, "path": str(eval_set.items[rows[video]].path), "reason": reason})
    return records
