"""Training configuration: typed dataclasses loaded from YAML, checked before anything runs.

A config file has four sections (``model``, ``data``, ``optim``, ``run``) and an optional ``paper``
block with the numbers the paper reports for that setting. A file may start from another one with
``base: other.yaml`` (a path relative to the file, or a bundled config's name such as
``msrvtt_b32_tempme``); its values are merged in, the file's own win.

Every key and value is checked against the dataclass fields below: an unknown key or a value of the
wrong type raises :class:`ConfigError` naming the file, the key path (``optim.lr``) and the value.
Command-line overrides (``optim.lr=1e-4``) are parsed with ``yaml.safe_load`` and checked the same way.
A config remembers which override or option set each value (:meth:`TrainConfig.source_of`), so that
an error names the source of the bad value, not the file it started from.

The bundled configs (one per row of the paper's main tables) live in ``tempme_train/configs``;
:func:`list_configs` names them and :func:`load_config` accepts those names as well as paths.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tempme.config import MIN_WORDS, MergeMethod, TextConfig, settings_ignored_by
from tempme.files import atomic_file
from tempme.data import check_batch_fits_in_memory

CONFIG_DIR = Path(__file__).with_name("configs")

Method = MergeMethod
Trainable = Literal["lora", "full"]
Precision = Literal["fp32", "bf16", "fp16"]
HOLDOUT = "holdout"
NO_VALIDATION = "none"


class ConfigError(ValueError):
    """A config value that is unknown, of the wrong type or unusable; names where it came from.

    The message is ``source: key: reason (got value)``. ``key`` None leaves it out (a problem with a
    whole file); ``show_value=False`` leaves out the value, for a ``reason`` that already shows it.
    """

    def __init__(self, source: str, key: str | None, value: Any, reason: str, *, show_value: bool = True):
        self.source, self.key, self.value, self.reason, self.show_value = source, key, value, reason, show_value
        message = f"{source}: {key}: {reason}" if key is not None else f"{source}: {reason}"
        if show_value:
            message += f" (got {_short_repr(value)})"
        super().__init__(message)


class ProcessConfigError(ConfigError):
    """A setting that fails on this process alone (no GPU left for its LOCAL_RANK): under torchrun,
    an error each process prints itself, where the other setting errors are the same on every one."""


def _short_repr(value: Any, limit: int = 80) -> str:
    # reprlib, not repr: YAML aliases can make a value of a few lines gigabytes long once written out.
    text = _LIMITED_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_LIMITED_REPR = reprlib.Repr()
_LIMITED_REPR.maxstring = _LIMITED_REPR.maxother = 200


# --- the dataclass tree ------------------------------------------------------------------------


@dataclass
class ScheduleOverrides:
    """Changes to the paper's merge schedule for this backbone and frame count; ``None`` keeps it."""

    tome_r: int | None = None
    merge_layers: list[int] | None = None
    clips_joined: list[int] | None = None
    cross_merge_ratio: float | None = None
    intra_merge_ratio: float | None = None
    clip_pos_embed: bool | None = None
    prop_attn: bool | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """The overrides that are set, as keyword arguments for ``tempme.build_config``."""
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}


@dataclass
class ModelSettings:
    """Which model to fine-tune.

    ``weights`` is a CLIP checkpoint (file or a name ``tempme.load_model`` knows); when it is empty the
    model is built from ``preset`` with random weights seeded by ``optim.seed`` (tests and demos).
    """

    preset: str = "ViT-B/32"
    weights: str | None = None
    method: Method = "tempme"
    frames: int = 12
    lora_rank: int = 8
    trainable: Trainable = "lora"
    schedule: ScheduleOverrides = field(default_factory=ScheduleOverrides)


@dataclass
class DataSettings:
    """Dataset, splits and the video/text pipeline.

    ``val_split`` is a split name of the dataset, ``holdout`` (the last ``holdout_videos`` videos of
    the training split are kept out of training and used for validation) or ``none`` (no validation:
    the run keeps its final weights). Model selection always uses the validation split;
    ``test_split`` is only read by ``tempme eval``.
    """

    dataset: Literal["msrvtt", "didemo", "activitynet", "lsmdc", "custom"] = "msrvtt"
    anno_path: str = ""
    video_dir: str = ""
    train_split: str = "train"
    val_split: str = "val"
    holdout_videos: int = 0
    test_split: str = "test"
    max_words: int = 32
    max_frames: int = 12
    framerate: float = 1.0
    image_size: int = 224
    augment: bool = True
    frame_cache: str | None = None
    backend: Literal["pyav", "decord"] = "pyav"
    num_workers: int = 4
    strict: bool = False


@dataclass
class OptimSettings:
    """The paper's recipe (SPEC section 6); ``batch_size`` is the global batch over all processes."""

    lr: float = 6e-4
    weight_decay: float = 0.2
    eps: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: float = 0.1
    epochs: int = 5
    batch_size: int = 128
    grad_clip: float = 1.0
    # The gradient of the global-batch loss is divided by this before clipping and the optimizer step.
    # The paper's run averaged over its 4 GPUs (SPEC section 6), so its clipping threshold and Adam's
    # eps acted on a quarter of the gradient: 4 reproduces it, whatever this run's number of processes.
    gradient_divisor: float = 4.0
    precision: Precision = "fp32"
    seed: int = 42


@dataclass
class RunSettings:
    """Where outputs go and how often to log, validate and checkpoint.

    ``eval_every`` counts optimizer steps (0: only at epoch ends). ``stop_after`` ends the run after
    that many steps with a ``last`` checkpoint, without shortening the schedule, so ``--resume``
    continues exactly as if the run had not stopped (smoke runs, time-limited jobs).
    ``deterministic`` makes GPU runs bitwise repeatable (and resumed runs equal to uninterrupted
    ones) at some cost in speed; CPU runs are repeatable without it. ``compile`` trains through
    ``torch.compile`` (minutes of compilation first; evaluation and checkpoints use the plain model).
    """

    output_dir: str = "runs/tempme"
    eval_every: int = 150
    log_every: int = 10
    eval_batch_size: int = 16
    tensorboard: bool = False
    progress: bool = True
    device: str = "auto"
    stop_after: int | None = None
    deterministic: bool = False
    compile: bool = False


@dataclass
class PaperResults:
    """What the paper reports for this setting (percent / ranks), for comparison only."""

    t2v: dict[str, float] = field(default_factory=dict)
    v2t: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass
class TrainConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)
    paper: PaperResults = field(default_factory=PaperResults)

    # Where values came from, for error messages: setting key -> source, e.g. {"": "run.yaml",
    # "optim.epochs": "run.yaml", "optim.lr": "command-line override 'optim.lr=1e-4'"}, where "" stands
    # for the settings left at their defaults.
    # Filled in by load_config, apply_overrides, with_settings and config_from_dict. Deliberately not
    # annotated, so it is no dataclass field: it is not a setting, so it is not saved, not compared, and
    # cannot be set from a file. (dataclasses.replace drops it; errors then name the caller's source.)
    origins = types.MappingProxyType({})

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-friendly data (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def source_of(self, key: str, default: str = "config") -> str:
        """Where setting ``key`` (``optim.lr``, ``model.schedule.merge_layers[0]``) got its value: the
        override or option that set it or a section above it, else the file, else ``default``."""
        return _source_in(self.origins, key, default)

    def blame(self, error: ConfigError) -> ConfigError:
        """``error``, naming where this config got the value of ``error.key`` as its source.

        For code that checks a loaded config further and only knows the config file: wrap that work in
        ``except ConfigError as error: raise config.blame(error) from None``.
        """
        return _blame(self.origins, error)


def _source_in(origins: Mapping[str, str], key: str, default: str) -> str:
    if key.startswith("--"):  # an option of the command (--split), not a setting of any file
        return "command line"
    key = re.sub(r"\[\d+\]", "", key)  # a list element comes from where its list came from
    # A setting comes from where it or the section above it was set ...
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in origins:
            return origins[name]
    # ... and a section from where the settings in it were set (model.schedule from an override of
    # model.schedule.merge_layers).
    below = dict.fromkeys(source for name, source in origins.items() if name.startswith(key + "."))
    if below:
        return " and ".join(below)
    return origins.get("", default)


def _blame(origins: Mapping[str, str], error: ConfigError) -> ConfigError:
    if error.key is None:
        return error
    source = _source_in(origins, error.key, error.source)
    if source == error.source:
        return error
    return type(error)(source, error.key, error.value, error.reason, show_value=error.show_value)


def _set_origin(origins: dict[str, str], key: str, source: str) -> None:
    """Record that ``source`` set ``key``, and so everything under it."""
    for name in [name for name in origins if name.startswith(key + ".")]:
        del origins[name]
    origins[key] = source


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a key given twice in one mapping is an error: PyYAML
    keeps the last silently, so a second ``model:`` section would drop the first."""

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, expanded by the base class
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice (first on line {first_line[key] + 1})",
                        key_node.start_mark,
                    )
                first_line[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: the base class says so
                pass
        return super().construct_mapping(node, deep)


def describe_yaml_error(error: yaml.YAMLError, text: str | None = None) -> str:
    """A YAML syntax error in one line, saying where (line and column, from 1) and what, e.g.
    ``invalid YAML at line 3, column 2: mapping values are not allowed here``. ``text``: the YAML read.

    PyYAML's own text spans several lines, with an excerpt of the input under a caret.
    """
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        message = f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
        if error.context:
            message += f" ({error.context}"
            if error.context_mark is not None:
                start = error.context_mark
                message += f" that starts at line {start.line + 1}, column {start.column + 1}"
            message += ")"
        return message
    if isinstance(error, yaml.reader.ReaderError) and text is not None:
        # A control character (as in a binary file that happens to be valid UTF-8); only its offset is given.
        line = text.count("\n", 0, error.position) + 1
        column = error.position - text.rfind("\n", 0, error.position)
        return f"invalid YAML at line {line}, column {column}: character #x{error.character:04x} ({error.reason})"
    lines = str(error).strip().splitlines()
    return f"invalid YAML: {lines[0] if lines else type(error).__name__}"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# --- type checking -------------------------------------------------------------------------------

# PyYAML follows YAML 1.1, which reads "6e-4" (no dot) as a string; accept that spelling for floats.
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    """``value`` checked against the type ``hint`` (converted where lossless), or a ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, key)
    if origin in (typing.Union, types.UnionType):
        # Only Optional[X] is used: None, or X with X's own error naming the exact element that is wrong.
        options = [arg for arg in args if arg is not type(None)]
        if len(options) != 1:
            raise TypeError(f"unsupported config field type {hint!r} at {key}")
        return None if value is None else _coerce(value, options[0], source, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(source, key, value, f"expected one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, key, value, "expected a list, such as [1, 2, 3]")
        return [_coerce(item, args[0], source, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(source, key, value, f"expected a list of {len(args)} values, such as [{', '.join(['...'] * len(args))}]")
        return tuple(_coerce(item, arg, source, f"{key}[{i}]") for i, (item, arg) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, key, value, "expected a mapping")
        return {str(k): _coerce(item, args[1], source, f"{key}.{k}") for k, item in value.items()}
    return _coerce_scalar(value, hint, source, key)


def _coerce_scalar(value: Any, hint: type, source: str, key: str) -> Any:
    # bool is a subclass of int in Python; a YAML "true" must not pass as a number (or vice versa).
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(source, key, value, "expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(source, key, value, "expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            number = float(value)  # "1e999" overflows to inf here
        else:
            raise ConfigError(source, key, value, "expected a number")
        # YAML spells infinity and NaN .inf and .nan; no setting means either, and NaN even passes
        # range checks (every comparison with it is False), to surface only as a NaN loss mid-run.
        if not math.isfinite(number):
            raise ConfigError(source, key, value, "expected a finite number")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        if value is None:  # `data.video_dir=` and `video_dir:` say empty; YAML reads them as null
            return ""
        raise ConfigError(source, key, value, "expected a string")
    raise TypeError(f"unsupported config field type {hint!r} at {key}")


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    """An instance of the dataclass ``cls`` from a mapping, every key and value checked."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, prefix or "<top level>", data, "expected a mapping of settings")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(source, path, value, f"unknown setting; valid settings here: {sorted(names)}")
        values[key] = _coerce(value, hints[key], source, path)
    return cls(**values)


# --- loading ----------------------------------------------------------------------------------------


def list_configs() -> list[str]:
    """Names of the bundled configs (files starting with ``_`` are shared bases, not listed)."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml") if not path.name.startswith("_"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path: an existing path, or the name of a bundled config."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.suffix in ("", ".yaml") and path.parent == Path(".") and bundled.is_file():
        return bundled
    raise FileNotFoundError(
        f"config {str(name_or_path)!r} is neither a file nor a bundled config; bundled: {', '.join(list_configs())}"
    )


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """The mapping in ``path`` with its ``base:`` chain merged underneath, and which file set which
    setting (see ``TrainConfig.origins``)."""
    if path.resolve() in chain:
        raise ConfigError(str(path), "base", str(path), "config files include each other in a loop")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(str(path), None, None, f"cannot read ({error.strerror or error})", show_value=False) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        # A video or other binary file named by mistake.
        line = raw.count(b"\n", 0, error.start) + 1
        reason = f"not UTF-8 text (byte 0x{raw[error.start]:02x} on line {line}); a config is a YAML text file"
        raise ConfigError(str(path), None, None, reason, show_value=False) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as error:
        raise ConfigError(str(path), None, None, describe_yaml_error(error, text), show_value=False) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(str(path), "<top level>", data, "expected a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        origins = {key: str(path) for key in flat_settings(data)}
        _frames_follow(data, origins, set(origins), str(path))
        return data, origins
    if not isinstance(base, str):
        raise ConfigError(str(path), "base", base, "expected a file name")
    base_path = path.parent / base
    bundled = CONFIG_DIR / f"{base}.yaml"
    if not base_path.is_file() and Path(base).name == base and not Path(base).suffix and bundled.is_file():
        base_path = bundled  # a bundled config by name (no folder, no .yaml), as --config takes it
    if not base_path.is_file():
        raise ConfigError(
            str(path), "base", base,
            f"file not found: {base_path} (a path relative to this file, or a bundled config: {', '.join(list_configs())})",
        )
    base_data, origins = _read_yaml(base_path, chain + (path.resolve(),))
    for key in flat_settings(data):
        _set_origin(origins, key, str(path))
    merged = _deep_merge(base_data, data)
    _frames_follow(merged, origins, set(flat_settings(data)), str(path))
    return merged, origins


def _frames_follow(data: dict[str, Any], origins: dict[str, str], changed: set[str], source: str) -> None:
    """Where ``model.frames`` changed and ``data.max_frames`` did not, the data samples as many frames
    as the model now reads (the two must be equal: one number to give, not two)."""
    if "model.frames" in changed and "data.max_frames" not in changed:
        frames = data.get("model", {}).get("frames")
        if isinstance(data.get("data", {}), dict):
            data.setdefault("data", {})["max_frames"] = frames
            _set_origin(origins, "data.max_frames", source)


def flat_settings(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The values in ``data`` by dotted key (``{"optim": {"lr": 1e-4}}`` -> ``{"optim.lr": 1e-4}``),
    following nested mappings down."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_settings(value, name + "."))
        else:
            flat[name] = value
    return flat


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> ``(["optim", "lr"], "1e-4" parsed as YAML)``."""
    source = f"command-line override {text!r}"
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(source, key or "<empty>", text, "expected KEY=VALUE, e.g. optim.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(source, key, raw, describe_yaml_error(error, raw)) from None
    # YAML would take part of the text silently: refused, as the value meant is plain to see.
    quoted = raw.strip()[:1] in ("'", '"')
    if not quoted and (" #" in raw or "\t#" in raw or raw.strip().startswith("#")):
        raise ConfigError(source, key.strip(), raw, "YAML reads ' #' as the start of a comment and would drop the "
                          f"rest: quote the value ({key.strip()}='...')", show_value=False)
    if not quoted and key.strip() in PATH_SETTINGS and isinstance(value, (dict, list)):
        raise ConfigError(source, key.strip(), raw, f"YAML reads this path as a {type(value).__name__} (': ' or a "
                          f"leading '- '): quote it ({key.strip()}='...')", show_value=False)
    return key.strip().split("."), value


def _apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[keys[-1]] = value


def config_from_dict(
    data: dict[str, Any], source: str = "<dict>", origins: Mapping[str, str] | None = None
) -> TrainConfig:
    """A checked :class:`TrainConfig` from plain data (raises ConfigError).

    ``origins``: which source set which settings (see ``TrainConfig.origins``); the rest came from
    ``source``. An error names the source of the setting it is about.
    """
    origins = {"": source, **(origins or {})}
    try:
        config = _with_home_expanded(_build(TrainConfig, data, source, ""))
        config.origins = origins
        check_values(config, source)
    except ConfigError as error:
        raise _blame(origins, error) from None
    return config


# Settings that name files or folders: ``~/data`` in them means the home folder, as in a shell.
PATH_SETTINGS = ("data.anno_path", "data.video_dir", "data.frame_cache", "run.output_dir", "model.weights")


def setting_value(config: TrainConfig, key: str) -> Any:
    """The value of the setting ``section.name`` (``optim.lr``) in ``config``."""
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _with_home_expanded(config: TrainConfig) -> TrainConfig:
    for key in PATH_SETTINGS:
        value = setting_value(config, key)
        if isinstance(value, str) and value.startswith("~"):
            section, name = key.split(".")
            setattr(config, section, dataclasses.replace(getattr(config, section), **{name: os.path.expanduser(value)}))
    return config


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), settings: Mapping[str, Any] | None = None
) -> TrainConfig:
    """Load a config file (or a bundled config name; ``None``: all defaults) and apply overrides.

    ``settings``: ``{"optim.batch_size": 1, ...}`` set before the file's values are checked, by a
    command to which they do not apply (``tempme flops`` counts one video, whatever the batches)."""
    data, origins, source = {}, {}, "default settings"
    if path is not None:
        file = resolve_config_path(path)
        data, origins = _read_yaml(file)
        source = str(file)
    for key, value in (settings or {}).items():
        _apply_override(data, key.split("."), value)
        _set_origin(origins, key, "the command")
    return apply_overrides(config_from_dict(data, source, origins), overrides)


# Settings added after training runs were first saved, with the value those runs trained with: a
# run resumed from an older checkpoint goes on as it started (or is told that a setting differs).
SETTINGS_ADDED = {"optim.gradient_divisor": 1.0}


def load_run_config(path: Path) -> TrainConfig:
    """The ``config.yaml`` that a training run stored; settings it predates take their ``SETTINGS_ADDED`` value."""
    stored = yaml.safe_load(path.read_text(encoding="utf-8"))
    stored_keys = set(flat_settings(stored if isinstance(stored, dict) else {}))
    predated = [f"{key}={value}" for key, value in SETTINGS_ADDED.items() if key not in stored_keys]
    return load_config(path, predated)


def apply_overrides(config: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """Apply ``KEY=VALUE`` overrides.

    Each override is type-checked on its own, so an error names the override that caused it; the
    checks across settings (``data.max_frames == model.frames`` ...) run once all are applied, so
    related settings can be changed together, and blame the override that set the value they name.
    """
    if not overrides:
        return config
    data, origins = config.to_dict(), dict(config.origins)
    changed: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        source = f"command-line override {text!r}"
        _apply_override(data, keys, value)
        _set_origin(origins, ".".join(keys), source)
        changed[".".join(keys)] = source
        _build(TrainConfig, data, source, "")
    _frames_follow(data, origins, set(changed), changed.get("model.frames", ""))
    return config_from_dict(data, config.source_of("", "command-line overrides"), origins)


def with_settings(config: TrainConfig, settings: dict[str, Any], source: str | Mapping[str, str]) -> TrainConfig:
    """A copy of ``config`` with ``{"data.video_dir": value, ...}`` set and checked like file values.

    For values that come from program code or command-line options (paths need no YAML quoting).
    ``source`` (``"--output"``, or one per setting: ``{"run.device": "--device"}``) is named by errors
    about these settings; errors about the others still name where those came from.
    """
    data, origins = config.to_dict(), dict(config.origins)
    for key, value in settings.items():
        _apply_override(data, key.split("."), value)
        _set_origin(origins, key, source if isinstance(source, str) else source[key])
    return config_from_dict(data, config.source_of("", "command-line options"), origins)


def save_config(config: TrainConfig, path: str | Path) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


# --- value checks (beyond types) -------------------------------------------------------------------


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_schedule_is_read(config: TrainConfig, source: str) -> None:
    """Refuse schedule settings that ``model.method`` never reads: an ablation that would train the
    same model as without them, while ``config.yaml`` recorded it. For new runs only: the configs
    stored with runs trained before this check must still load."""
    model = config.model
    for name in settings_ignored_by(model.method, model.schedule.as_kwargs()):
        key = f"model.schedule.{name}"
        method_from = config.source_of("model.method", source)
        set_by = f", set by {method_from}" if method_from != config.source_of(key, source) else ""
        raise config.blame(ConfigError(
            source, key, getattr(model.schedule, name),
            f"no effect with model.method={model.method}{set_by} (it does not read that setting)",
        ))


def check_values(config: TrainConfig, source: str) -> None:
    """Settings that type-check but cannot work together."""
    model, data, optim, run = config.model, config.data, config.optim, config.run

    def require(condition: bool, key: str, value: Any, reason: str) -> None:
        if not condition:
            raise config.blame(ConfigError(source, key, value, reason))

    def set_by(other: str, key: str) -> str:
        """For a check of two settings that names ``key``: where ``other`` was set, if elsewhere."""
        where = config.source_of(other, source)
        return f", set by {where}" if where != config.source_of(key, source) else ""

    positive = {
        "model.frames": model.frames,
        "data.max_frames": data.max_frames,
        "data.image_size": data.image_size,
        "optim.epochs": optim.epochs,
        "optim.batch_size": optim.batch_size,
        "run.log_every": run.log_every,
        "run.eval_batch_size": run.eval_batch_size,
    }
    for key, value in positive.items():
        require(value > 0, key, value, "must be positive")
    # Here, not when the model is built: its error would name the weights or preset it was built from.
    require(data.max_words >= MIN_WORDS, "data.max_words", data.max_words,
            f"must be at least {MIN_WORDS}: room for the start and end tokens and one word of the caption")
    context = TextConfig().context_length  # every CLIP's, bundled or loaded
    require(data.max_words <= context, "data.max_words", data.max_words,
            f"CLIP's text encoder reads at most {context} tokens, start and end included")
    require(data.max_frames == model.frames, "data.max_frames", data.max_frames,
            f"must equal model.frames ({model.frames}{set_by('model.frames', 'data.max_frames')}): "
            "the merge schedule is built for that many frames")
    # The most videos one process decodes at once: its share of a training batch, or an evaluation batch.
    videos = max(optim.batch_size // int(os.environ.get("WORLD_SIZE", 1)), run.eval_batch_size)
    try:
        check_batch_fits_in_memory(data.max_frames, data.image_size, videos)
    except ValueError as error:
        require(False, "data.max_frames", data.max_frames, str(error))
    require(model.lora_rank >= 0, "model.lora_rank", model.lora_rank, "must be >= 0")
    require(data.framerate > 0, "data.framerate", data.framerate, "must be positive")
    require(data.num_workers >= 0, "data.num_workers", data.num_workers, "must be >= 0")
    require(data.holdout_videos >= 0, "data.holdout_videos", data.holdout_videos, "must be >= 0")
    if data.val_split == HOLDOUT:
        require(data.holdout_videos > 0, "data.holdout_videos", data.holdout_videos,
                f"must be positive when data.val_split is 'holdout'{set_by('data.val_split', 'data.holdout_videos')}")
    require(optim.lr > 0, "optim.lr", optim.lr, "must be positive")
    require(optim.weight_decay >= 0, "optim.weight_decay", optim.weight_decay, "must be >= 0")
    require(optim.eps > 0, "optim.eps", optim.eps, "must be positive")
    require(all(0 <= b < 1 for b in optim.betas), "optim.betas", list(optim.betas), "each must be in [0, 1)")
    require(0 <= optim.warmup < 1, "optim.warmup", optim.warmup, "must be a fraction in [0, 1)")
    require(optim.grad_clip >= 0, "optim.grad_clip", optim.grad_clip, "must be >= 0 (0 disables clipping)")
    require(optim.gradient_divisor > 0, "optim.gradient_divisor", optim.gradient_divisor, "must be positive")
    require(run.eval_every >= 0, "run.eval_every", run.eval_every, "must be >= 0 (0: only at epoch ends)")
    require(run.stop_after is None or run.stop_after > 0, "run.stop_after", run.stop_after, "must be positive")
    require(bool(run.output_dir), "run.output_dir", run.output_dir, "must not be empty")
    require(bool(_DEVICE.match(run.device)), "run.device", run.device, "expected auto, cpu, cuda, cuda:N or mps")
