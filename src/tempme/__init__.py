"""tempme: efficient text-video retrieval with TempMe (CLIP + LoRA + progressive video token merging)."""

from .config import (
    CLIPConfig,
    LoRAConfig,
    MergeConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
    default_merge_config,
    get_preset,
    preset_names,
    register_preset,
)
from . import retrieval, weights
from .factory import build_config, create_model, load_model
from .model import TempMe
from .schedule import ScheduleError, build_plan, simulate
from .tokenizer import tokenize

__version__ = "0.2.0"

__all__ = [
    "CLIPConfig",
    "LoRAConfig",
    "MergeConfig",
    "ModelConfig",
    "ScheduleError",
    "TempMe",
    "TextConfig",
    "VisionConfig",
    "build_config",
    "build_plan",
    "create_model",
    "default_merge_config",
    "get_preset",
    "load_model",
    "preset_names",
    "register_preset",
    "retrieval",
    "simulate",
    "tokenize",
    "weights",
]
