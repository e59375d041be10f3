"""Training and evaluation of TempMe on the text-video retrieval benchmarks.

``load_config`` reads a YAML config (or a bundled one, see ``list_configs``), ``train`` runs it and
``evaluate`` computes retrieval metrics. The command line wraps these as ``tempme train``,
``tempme eval`` and ``tempme prepare``.
"""

from .config import ConfigError, TrainConfig, list_configs, load_config
from .evaluate import EvalSet, evaluate
from .train import TrainSummary, train

__all__ = ["ConfigError", "EvalSet", "TrainConfig", "TrainSummary", "evaluate", "list_configs", "load_config", "train"]
