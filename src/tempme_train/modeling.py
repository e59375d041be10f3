"""Build the model a config describes, and read or write the weights a run trains."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from tempme import TempMe, create_model, load_model
from tempme.config import CLIPConfig, MergeConfig, ModelConfig, default_merge_config, get_preset, preset_names
from tempme.factory import build_config
from tempme.schedule import ScheduleError, check_setting_values, validate_merge_config
from tempme.userwarnings import SharedWarning, warn

from .config import ConfigError, TrainConfig, config_from_dict

# A run folder: LAST (the checkpoint to resume from, a folder holding WEIGHTS), BEST (the best
# validation's weights) or, after a run without validation, WEIGHTS (its final weights).
LAST = "last"
BEST = "best.safetensors"
WEIGHTS = "weights.safetensors"
TRAINED_FILES = (WEIGHTS, BEST)
BASE_FINGERPRINT = "base_fingerprint"  # metadata key of an adapters-only file: which backbone it fits


def build_model(config: TrainConfig, source: str = "config") -> TempMe:
    """The model of ``config.model`` with its trainable parameters set, on the CPU.

    The global torch seed is set to ``optim.seed`` first: the LoRA A matrices (and, without
    ``model.weights``, the whole random model) are initialised from it, so building twice gives the
    same model. That is what lets an adapters-only checkpoint be evaluated on top of its base later.
    """
    settings = config.model
    kwargs = dict(lora_rank=settings.lora_rank, max_words=config.data.max_words, **settings.schedule.as_kwargs())
    torch.manual_seed(config.optim.seed)
    try:
        if settings.weights:
            model = load_model(settings.weights, method=settings.method, frames=settings.frames, **kwargs)
        else:
            model = create_model(settings.preset, method=settings.method, frames=settings.frames, **kwargs)
    except ScheduleError as error:
        raise schedule_config_error(config, source, error) from error
    except (TypeError, ValueError) as error:
        # Unknown presets, unreadable weights ...
        key = "model.weights" if settings.weights else "model.preset"
        raise ConfigError(config.source_of(key, source), key, settings.weights or settings.preset, str(error)) from error
    if model.visual.image_size != config.data.image_size:
        raise ConfigError(
            source, "data.image_size", config.data.image_size,
            f"the model expects {model.visual.image_size}x{model.visual.image_size} frames: set "
            f"data.image_size={model.visual.image_size}",
        )
    model.set_trainable(settings.trainable)
    return model.train()


def schedule_config_error(config: TrainConfig, source: str, error: ScheduleError) -> ConfigError:
    """``error`` blamed on the setting at fault, where it was set: a schedule setting the config gives,
    else the frame count, else the method (whose paper schedule it is)."""
    given = config.model.schedule.as_kwargs()
    if error.setting in given:
        key, value = f"model.schedule.{error.setting}", given[error.setting]
    elif error.setting == "frames":
        key, value = "model.frames", config.model.frames
    elif given:  # the paper's value of a setting, at odds with the ones given
        key, value = "model.schedule", given
    else:
        key, value = "model.method", config.model.method
    # The messages of the settings themselves show their values already.
    return ConfigError(config.source_of(key, source), key, value, str(error),
                       show_value=key in ("model.schedule", "model.method"))


def named_preset(config: TrainConfig) -> str | None:
    """The preset whose architecture ``config.model`` is built on as far as the config tells: the one
    ``model.weights`` names, else ``model.preset`` (weights from a file have theirs); None for a
    name no preset has."""
    settings = config.model
    name = settings.weights if settings.weights in preset_names() else settings.preset
    return name if name in preset_names() else None


def config_on_preset(config: TrainConfig, schedule: dict | None = None) -> ModelConfig:
    """The ``ModelConfig`` of ``config.model`` on :func:`named_preset`'s architecture (which must be
    known), with ``schedule``'s settings instead of its own where given; its warnings are left to
    :func:`build_model`. Raises as ``build_config``."""
    settings = config.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_config(get_preset(named_preset(config)), method=settings.method, frames=settings.frames,
                            lora_rank=settings.lora_rank,
                            **(settings.schedule.as_kwargs() if schedule is None else schedule))


def check_schedule(config: TrainConfig, source: str = "config") -> None:
    """The merge schedule of ``config.model`` checked before any data or weights are read (which can
    take minutes, and a download), as :func:`build_model` would find it: on the architecture of the
    preset that ``model.weights`` or ``model.preset`` names. The depth of weights from a file is not
    known yet (the range of merge layers is left to :func:`build_model`); a tempme file built for
    this method and frame count starts from the schedule it records, which only its header says: there
    only the settings no model can run are checked."""
    settings = config.model
    preset = named_preset(config)
    if preset is None:
        return  # an unknown preset: build_model says so
    clip = get_preset(preset)
    from_file = bool(settings.weights) and settings.weights != preset
    try:
        if from_file and recorded_schedule(settings.weights, settings.method, settings.frames) is not None:
            merge = default_merge_config(clip, settings.frames, settings.method).replace(**settings.schedule.as_kwargs())
            check_setting_values(merge, settings.frames)
            return
        model = config_on_preset(config)
        validate_merge_config(model.merge, None if from_file else clip.vision.layers, model.frames)
    except ScheduleError as error:
        raise schedule_config_error(config, source, error) from error
    except (TypeError, ValueError):
        return  # not the schedule's: build_model says what


def recorded_schedule(weights: str | None, method: str, frames: int) -> MergeConfig | None:
    """The merge schedule the weights file ``weights`` records, where it is a tempme file whose
    recorded model has ``method`` and ``frames`` (``load_model`` then starts from that schedule, not
    the paper's); None otherwise. Reads the file's header only."""
    recorded = recorded_model_config(weights)
    if recorded is None or (recorded.merge.method, recorded.frames) != (method, frames):
        return None
    return recorded.merge


def recorded_model_config(weights: str | Path | None) -> ModelConfig | None:
    """The model a tempme weights file records (None for presets, other weights and unreadable
    files, which building the model reports). Reads the file's header only."""
    from tempme.weights import model_config_from_metadata

    if not weights:
        return None
    try:
        return model_config_from_metadata(recorded_metadata(Path(weights).expanduser()))
    except ValueError:
        return None


def built_schedule(config: TrainConfig, clip: CLIPConfig) -> MergeConfig | None:
    """The merge schedule :func:`build_model` gives ``config.model`` on the architecture ``clip``:
    its schedule settings over the schedule ``model.weights`` records for this method and frame
    count, else over the paper's (None where they make no schedule: building the model says why)."""
    settings = config.model
    schedule = recorded_schedule(settings.weights, settings.method, settings.frames)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # build_model gives them
            return build_config(clip, method=settings.method, frames=settings.frames, schedule=schedule,
                                **settings.schedule.as_kwargs()).merge
    except (TypeError, ValueError):
        return None


def check_preset_matches_weights(model: TempMe, config: TrainConfig, source: str = "config") -> None:
    """Refuse weights of another known backbone than ``model.preset`` names: the model is built from
    the weights, while the stored config, ``tempme flops --config`` and a reader of the config would
    all take the preset's word for it (a B/16 config given B/32 weights trains a B/32 with the B/32
    schedule). Weights of a layout no preset has are built as they are, with a warning."""
    preset = config.model.preset
    key_source = config.source_of("model.preset", source)
    try:
        wanted = get_preset(preset).vision
    except ValueError as error:
        raise ConfigError(key_source, "model.preset", preset, str(error), show_value=False) from None
    built = model.config.clip.vision
    layout = ("width", "layers", "patch_size", "image_size")
    if all(getattr(built, name) == getattr(wanted, name) for name in layout):
        return
    held = f"a ViT of width {built.width}, {built.layers} layers, patch {built.patch_size}, {built.image_size} px"
    same = [name for name in preset_names()
            if all(getattr(get_preset(name).vision, field) == getattr(built, field) for field in layout)]
    if not same:
        warn(f"{key_source}: model.preset={preset} does not describe model.weights {config.model.weights}, which "
             f"hold {held}; the model is built from the weights (the preset names it in the config only)",
             SharedWarning)
        return
    raise ConfigError(
        key_source, "model.preset", preset,
        f"model.weights {config.model.weights} hold {same[0]}, not {preset}: set model.preset={same[0]} "
        "or choose that backbone's config",
    )


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter for everything the optimizer updates, in a fixed order."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def base_fingerprint(model: TempMe) -> str:
    """Hex digest of the backbone: every weight except the adapters (LoRA, clip positional embeddings).

    Adapters only make sense on the backbone they were trained on; an adapters-only file records
    this digest so that loading it on top of other weights can be refused (:func:`check_base`).
    Reads every weight once (about a second for ViT-B/32): take it once per run.
    """
    from tempme.model import is_adapter_parameter
    from tempme.weights import tensors_digest

    return tensors_digest((name, t) for name, t in model.state_dict().items() if not is_adapter_parameter(name))


def save_trained_weights(model: TempMe, path: str | Path, config: TrainConfig, base: str | None = None) -> None:
    """Write what the run trained as a tempme weights file (atomic, model config in the metadata).

    LoRA runs store the adapters only (LoRA and clip positional embeddings, about 2 MB); they are
    applied on top of ``model.weights`` (or the seeded random model) when loaded with
    :func:`load_trained_weights`. Full fine-tuning stores every weight. ``base``: the
    :func:`base_fingerprint` of the model before training, recorded in adapters-only files
    (computed here when not given).
    """
    from tempme.weights import save_weights

    adapters_only = config.model.trainable == "lora"
    extra = {"train_config": json.dumps(config.to_dict())}
    if adapters_only:
        extra[BASE_FINGERPRINT] = base or base_fingerprint(model)
    save_weights(model, path, adapters_only=adapters_only, extra_metadata=extra)


def recorded_metadata(path: str | Path) -> dict[str, str]:
    """The metadata tempme train records in its safetensors files; ``{}`` for other weights files
    (a torch ``.pt`` has none), which are then taken as they are."""
    from tempme.weights import read_metadata

    try:
        return read_metadata(path)
    except ValueError:
        return {}


def check_base(model: TempMe, trained: str | Path, base_weights: str) -> None:
    """Refuse to apply an adapters-only file to a backbone other than the one it was trained on.

    ``base_weights`` names the backbone ``model`` was built from (for the message). Files that hold
    every weight replace the backbone anyway; older files that record no fingerprint are not checked.
    """
    recorded = recorded_metadata(trained).get(BASE_FINGERPRINT)
    if recorded is not None and recorded != base_fingerprint(model):
        trained_on = train_config_of(trained).model
        if trained_on.lora_rank != model.config.lora.rank:  # the LoRA A matrices count in the fingerprint
            raise ValueError(f"{trained} holds adapters of LoRA rank {trained_on.lora_rank}, the model was built with "
                             f"model.lora_rank={model.config.lora.rank}: leave model.lora_rank as it was trained")
        same_file = trained_on.weights and (
            Path(trained_on.weights).expanduser().absolute() == Path(base_weights).expanduser().absolute()
        )
        if same_file:
            raise ValueError(
                f"{trained} holds adapters trained on {base_weights}, whose weights have changed since "
                "(replaced or edited in place): give the base weights it was trained on"
            )
        raise ValueError(
            f"{trained} holds adapters trained on {trained_on.weights or 'the random ' + trained_on.preset}, "
            f"not on {base_weights} (their weights differ): give the same base weights, or none to use "
            "the ones the training config names"
        )


def load_trained_weights(model: TempMe, path: str | Path) -> None:
    """Load a file written by :func:`save_trained_weights` into ``model`` (in place).

    An adapters-only file replaces just the adapters; the model's own backbone fills in the rest.
    Clip positional embeddings that do not fit ``model`` (built for another method or frame count)
    are left out, with a warning.
    """
    from tempme.weights import WeightsError, load_state_dict_into, load_weights, without_unfitting_clip_pos_embeds

    trained = without_unfitting_clip_pos_embeds(model, load_weights(path).state_dict, path)
    try:
        load_state_dict_into(model, {**model.state_dict(), **trained})
    except WeightsError as error:
        raise WeightsError(f"{path}: {error}") from None


def find_trained_weights(path: str | Path) -> Path:
    """The weights file of ``path``: the file itself, a checkpoint's ``weights.safetensors`` (also in
    a run folder after a run without validation) or a run folder's ``best.safetensors``."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    for name in TRAINED_FILES:
        if (path / name).is_file():
            return path / name
    hint = ""
    if (path / LAST / WEIGHTS).is_file():  # a run stopped before its first validation
        hint = f"; its last checkpoint is {path / LAST} (name that)"
    else:  # a folder of runs
        runs = sorted(child.name for child in path.iterdir()
                      if child.is_dir() and any((child / name).is_file() for name in TRAINED_FILES))
        if runs:
            hint = f"; the runs in it: {', '.join(runs[:10])}{' ...' if len(runs) > 10 else ''} (name one)"
    raise FileNotFoundError(f"{path}: not a weights file, and holds none of {', '.join(TRAINED_FILES)}{hint}")


def stored_config(trained: str | Path) -> TrainConfig | None:
    """The training config recorded in a weights file written by tempme train (None for other files)."""
    return train_config_of(trained) if "train_config" in recorded_metadata(trained) else None


def check_weights_option(trained: str | Path, weights: str) -> None:
    """--weights with --checkpoint is allowed only to give the base weights the adapters were trained
    on from another place (a moved file, a local copy of a preset): :func:`check_base`
    then compares the backbones. Files holding every weight need no base, and adapters that record
    no base fingerprint (older files) cannot be checked, so there any other weights are refused."""
    stored = stored_config(trained)
    if stored is None:
        return  # not from tempme train: what it holds is read as it is, with --weights as the base
    if stored.model.trainable == "full":
        raise ValueError(
            f"--weights {weights}: {trained} holds every weight of its fine-tuned model, so base weights "
            "would be ignored; leave --weights out"
        )
    if BASE_FINGERPRINT not in recorded_metadata(trained) and weights != stored.model.weights:
        raise ValueError(
            f"--weights {weights}: {trained} does not record which base weights its adapters fit (its config "
            f"names {stored.model.weights or 'the seeded random ' + stored.model.preset}), so other weights "
            "cannot be checked; leave --weights out"
        )


def load_trained_model(checkpoint: str | Path, base_weights: str | None = None) -> TempMe:
    """The model a ``tempme train`` run (or its weights file) holds, on the base weights its training
    config names, or on ``base_weights`` (the same weights from another place, checked), in eval mode."""
    trained = find_trained_weights(checkpoint)
    config = train_config_of(trained)
    if base_weights:
        check_weights_option(trained, base_weights)
        config.model.weights = base_weights
    elif config.model.trainable == "full":
        config.model.weights = str(trained)  # every weight is in the file: the base trained on may be gone
    elif config.model.weights and Path(config.model.weights).is_absolute() and not Path(config.model.weights).exists():
        raise FileNotFoundError(
            f"{trained} was trained on the base weights {config.model.weights}, which are not there any "
            "more: name where they are now (--weights beside --checkpoint; base_weights from Python)"
        )
    model = build_model(config, str(trained))
    check_base(model, trained, config.model.weights or f"random {config.model.preset}")
    load_trained_weights(model, trained)
    return model.eval()


def train_config_of(weights_file: str | Path) -> TrainConfig:
    """The training config stored in a file written by :func:`save_trained_weights`."""
    from tempme.weights import WeightsError, read_metadata

    try:
        stored = read_metadata(weights_file).get("train_config")
    except WeightsError as error:
        raise WeightsError(
            f"{error}: not a checkpoint written by tempme train (for CLIP or other weights, use --weights)"
        ) from None
    if stored is None:
        raise ValueError(f"{weights_file} does not record its training config (not written by tempme train): "
                         "give CLIP or tempme weights as --weights, or pass --config with the model's settings")
    return config_from_dict(json.loads(stored), f"training config stored in {weights_file}")
