"""The training loop: contrastive fine-tuning of TempMe with the paper's recipe (SPEC section 6).

One call, :func:`train`, runs a whole (or resumed) run from a :class:`TrainConfig`:

1. check everything before the first step: device, output folder, annotations, video files, model;
2. train with AdamW + warmup/cosine, gradient clipping and optional bf16/fp16 autocast, over the
   global batch shared by all processes (see ``distributed.py`` for how gradients are combined);
3. validate every ``run.eval_every`` steps and at each epoch end on the validation split, keeping
   ``best.safetensors`` (highest text-to-video R@1) and a resumable ``last/`` checkpoint;
4. on Ctrl-C, write ``last/`` at the last completed step before stopping.

Outputs in ``run.output_dir``: ``config.yaml``, ``metrics.jsonl``, ``best.safetensors``, ``last/``
and optionally ``tensorboard/``. Launch several processes with ``torchrun``; rank 0 logs,
validates and writes files while the others wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tempme import TempMe
from tempme.files import check_folder
from tempme.precision import autocast
from tempme.progress import progress_bar
from tempme.retrieval import contrastive_loss

from .checkpoint import (
    BEST,
    CONFIG,
    LAST,
    Progress,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig, load_config, save_config
from .data import EpochSampler, TrainData, make_train_loader, prepare_training_data
from .distributed import (
    WorldInfo,
    all_gather_objects,
    all_gather_with_grad,
    all_reduce_gradients,
    barrier,
    broadcast_parameters,
    init_distributed,
    shutdown,
    world_from_env,
)
from .evaluate import evaluate
from .modeling import base_fingerprint, build_model, save_trained_weights, trainable_parameters
from .optim import build_optimizer, build_scheduler
from .tracking import MetricsLog, require_tensorboard

# Settings a resumed run must share with the checkpoint: they change what the steps compute.
RESUME_DATA_KEYS = (
    "dataset", "train_split", "val_split", "holdout_videos", "max_words", "max_frames", "framerate",
    "image_size", "augment",
)


@dataclass
class TrainSummary:
    """What a call to :func:`train` did. ``losses`` are this session's per-step global-batch losses."""

    output_dir: str
    steps: int
    total_steps: int
    stopped_early: bool
    losses: list[float] = field(default_factory=list)
    best_val_r1: float | None = None
    best_step: int | None = None
    last_val: dict[str, Any] | None = None
    best_weights: str | None = None
    last_checkpoint: str | None = None
    skipped_videos: list[str] = field(default_factory=list)
    missing_videos: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StepResult:
    """``loss``: the global-batch loss (``None`` when the batch had no sample); ``lr``: the rate used."""

    loss: float | None
    lr: float


def resolve_device(name: str, world: WorldInfo, source: str = "config") -> torch.device:
    """``auto``: this process's GPU when there is one (``cuda:LOCAL_RANK``), else the CPU.

    A device this machine lacks (CUDA on a CPU-only torch, ``cuda:9`` on a one-GPU machine, MPS off
    a Mac) is a ConfigError naming ``run.device``, before any work: torch itself would fail only at
    the first tensor moved there, with an assertion. (``tempme.bench.resolve_device`` checks the same
    for the index, search and bench commands.)
    """
    if name == "auto":
        return torch.device(f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(
                source, "run.device", name,
                f"CUDA is not available (torch {torch.__version__}, {build}); use cpu or auto",
            )
        if device.index is None:
            device = torch.device(f"cuda:{world.local_rank}")
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ConfigError(
                source, "run.device", name,
                f"this machine has {count} GPU{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1}); "
                f"{device} does not exist",
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(source, "run.device", name, "MPS (Apple GPU) is not available here; use cpu or auto")
    return device


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) back until the block ends, then deliver it.

    Wraps the optimizer update: stopped half-way, some parameters would hold the new step and
    others the old one while the step counter says neither, and the checkpoint written on the
    interrupt would match no step. Only the main thread may set signal handlers; elsewhere (and
    under a non-Python handler) the block runs unprotected.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)  # to the handler that was there: KeyboardInterrupt by default


def compute_gradients(
    model: TempMe,
    batch: dict[str, Any] | None,
    params: list[torch.nn.Parameter],
    device: torch.device,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> float | None:
    """Forward this process's batch, compute the loss over the global batch and backpropagate.

    ``model`` may be the ``torch.compile`` wrapper of the model (``run.compile``): it shares the
    parameters and forwards attribute access.

    Afterwards ``params`` hold the gradient of the global-batch loss (summed over processes), scaled
    by ``scaler`` if given. ``batch`` is ``None`` when all its videos were undecodable; the process
    still takes part in the collectives.

    Returns:
        The global-batch loss, or ``None`` when the global batch has no sample at all.
    """
    if batch is None:
        video = text = torch.zeros(0, model.config.clip.embed_dim, device=device)
    else:
        with autocast(device, precision):
            video, text = model(
                batch["video"].to(device, non_blocking=True),
                batch["text_ids"].to(device, non_blocking=True),
                batch["text_mask"].to(device, non_blocking=True),
                batch["video_mask"].to(device, non_blocking=True),
            )
    # Gather in float32 so every process contributes the same dtype and the loss is computed in fp32.
    video = all_gather_with_grad(video.float())
    text = all_gather_with_grad(text.float())
    if video.shape[0] == 0:
        return None
    loss = contrastive_loss(text, video, model.logit_scale)
    if loss.requires_grad:  # False on a process whose own batch was empty
        (scaler.scale(loss) if scaler is not None else loss).backward()
    all_reduce_gradients(params)
    return loss.item()


class Trainer:
    """Holds one run's model, optimizer, data and progress; :meth:`run` trains to the end."""

    def __init__(self, config: TrainConfig, world: WorldInfo, resume: bool, data: TrainData | None, source: str):
        self.config, self.world = config, world
        self.output = Path(config.run.output_dir)
        self.device = resolve_device(config.run.device, world, source)
        if world.is_main:
            check_folder(self.output, f"{source}: run.output_dir")
        checkpoint = self._check_output(resume, source)
        if config.run.tensorboard:
            require_tensorboard(source)
        self.data = data if data is not None else prepare_training_data(config, source)
        optim = config.optim
        self.sampler = EpochSampler(len(self.data.train), optim.batch_size, world.world_size, world.rank, optim.seed)
        model = build_model(config, source)
        # Recorded in adapters-only files, so they are never applied to another backbone; the
        # backbone does not train, so one digest serves the whole run.
        self.base_fingerprint = base_fingerprint(model) if config.model.trainable == "lora" else None
        self.model = model.to(self.device)
        # The compiled wrapper shares the model's parameters; only the training forward goes through it.
        self.forward_model = torch.compile(self.model, dynamic=False) if config.run.compile else self.model
        self.params = list(trainable_parameters(self.model).values())
        broadcast_parameters(self.params)
        self.loader = make_train_loader(
            self.data.train, self.sampler, config.data.num_workers, pin_memory=self.device.type == "cuda"
        )
        self.total_steps = self.sampler.steps_per_epoch * optim.epochs
        self.optimizer = build_optimizer(self.params, optim.lr, optim.betas, optim.eps, optim.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, optim.warmup)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=optim.precision == "fp16")
        self.progress = Progress()
        if checkpoint is not None:
            self.progress = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler, self.scaler)
        self.saved_step = self.progress.step  # the step last/ holds
        self.log = None
        if world.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output / CONFIG)
            self.log = MetricsLog(self.output, config.run.tensorboard, start_step=self.progress.step)
        self.summary = TrainSummary(
            str(self.output), self.progress.step, self.total_steps, False,
            best_val_r1=self.progress.best_r1, best_step=self.progress.best_step,
            missing_videos=list(self.data.missing_videos),
        )
        self._local_skipped: set[str] = set(self.progress.skipped_videos)
        self.window: list[StepResult] = []  # steps done but not yet in metrics.jsonl

    def _check_output(self, resume: bool, source: str) -> Path | None:
        """The checkpoint to resume from; refuses to overwrite a run or to resume a different one."""
        checkpoint = find_checkpoint(self.output)
        if not resume:
            if checkpoint is not None:
                raise ValueError(
                    f"{self.output} already holds a training run ({checkpoint}); "
                    "pass --resume to continue it or choose another output folder"
                )
            return None
        if checkpoint is None:
            raise FileNotFoundError(f"cannot resume: no checkpoint in {self.output / LAST}")
        saved = load_config(checkpoint / CONFIG)
        differences = _resume_differences(saved, self.config)
        if differences:
            key, (then, now) = next(iter(differences.items()))
            raise ConfigError(
                source, key, now,
                f"differs from the checkpoint's value {then!r}; a resumed run must keep "
                f"{', '.join(differences)} as in {checkpoint / CONFIG}",
            )
        return checkpoint

    # --- one step ---------------------------------------------------------------------------

    def step(self, batch: dict[str, Any] | None) -> StepResult:
        """One optimizer step on the global batch; its loss joins ``window`` (the steps not yet logged)."""
        if batch is not None:
            self._local_skipped.update(batch["skipped"])
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        loss = compute_gradients(
            self.forward_model, batch, self.params, self.device, self.config.optim.precision, self.scaler
        )
        with interrupts_deferred():  # all of the update and its record, or none of it
            if loss is not None:
                if self.config.optim.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            # The schedule advances even on an empty batch, so it stays tied to the data position. (Also
            # when fp16 loss scaling skipped the optimizer step for overflowing gradients, which torch
            # warns about as if the calls were out of order: they are not.)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                self.scheduler.step()
            self.progress.step += 1
            result = StepResult(loss, lr)
            if loss is not None:
                self.window.append(result)
                self.summary.losses.append(loss)
        return result

    # --- validation and checkpoints -------------------------------------------------------------

    def validate(self) -> None:
        """Rank 0 evaluates the validation split and keeps ``best.safetensors``; others wait."""
        if self.data.val is None:
            return
        if self.world.is_main:
            # Validation's bars would nest under the training bar, which tqdm draws with cursor-up
            # codes: fine on a terminal, garbage in a log file. There the training bar is enough.
            results = evaluate(
                self.model, self.data.val, self.config.run.eval_batch_size, self.device,
                self.config.optim.precision, self.config.data.num_workers,
                progress=self.config.run.progress and sys.stderr.isatty(),
            )
            r1 = results["t2v"]["R1"]
            self.log.write("val", self.progress.step, {"t2v": results["t2v"], "v2t": results["v2t"]})
            self.summary.last_val = results
            if self.progress.best_r1 is None or r1 > self.progress.best_r1:
                # The file first: interrupted in between, progress still names the previous best.
                save_trained_weights(self.model, self.output / BEST, self.config, self.base_fingerprint)
                self.progress.best_r1, self.progress.best_step = r1, self.progress.step
            self.summary.best_val_r1, self.summary.best_step = self.progress.best_r1, self.progress.best_step
        self.model.train()
        barrier()

    def save(self) -> None:
        """Write ``last/`` (rank 0), after collecting every process's skipped videos."""
        skipped = set().union(*all_gather_objects(sorted(self._local_skipped)))
        self.progress.skipped_videos = sorted(skipped)
        if self.world.is_main:
            self._write_last()
        self.saved_step = self.progress.step  # on every process: they decide alike whether to save
        barrier()

    def _write_last(self) -> None:
        save_checkpoint(
            self.output / LAST, self.model, self.config, self.optimizer, self.scheduler, self.scaler,
            self.progress, self.sampler.steps_per_epoch, self.base_fingerprint,
        )

    def save_interrupted(self) -> None:
        """On Ctrl-C: rank 0 writes ``last/`` at the last completed step and says so.

        No collectives: the other processes are being interrupted too, so waiting for them could hang.
        Their parameters equal rank 0's after every step; only their skipped-video lists are left out.
        """
        if not self.world.is_main:
            return
        step = self.progress.step
        if step == 0:  # nothing trained; a checkpoint would only make the next start need --resume
            print("training interrupted before the first step; nothing to save", file=sys.stderr)
            return
        if self.saved_step != step:
            self.progress.skipped_videos = sorted(set(self.progress.skipped_videos) | self._local_skipped)
            self._write_last()
            self.saved_step = step
        print(
            f"training interrupted after step {step}/{self.total_steps}: saved {self.output / LAST}; "
            "continue with --resume",
            file=sys.stderr,
        )

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> TrainSummary:
        stop_after = self.config.run.stop_after
        end = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        bar = progress_bar(
            total=self.total_steps, initial=self.progress.step, desc="training", unit="step",
            disable=not (self.world.is_main and self.config.run.progress),
        )
        try:
            self._train_until(end, bar)
        except KeyboardInterrupt:
            bar.close()
            if self.window:
                self._log_train(self.progress.step, self.window)
            self.save_interrupted()
            raise
        bar.close()
        if self.saved_step != self.progress.step:
            self.save()
        return self._finish()

    def _train_until(self, end: int, bar) -> None:
        """Steps, with logging, validation and checkpoints as they fall due, until step ``end``."""
        steps_per_epoch = self.sampler.steps_per_epoch
        while self.progress.step < end:
            self.sampler.set_epoch(self.progress.epoch(steps_per_epoch), self.progress.batch_in_epoch(steps_per_epoch))
            for batch in self.loader:
                result = self.step(batch)
                step = self.progress.step
                bar.update(1)
                if result.loss is not None:
                    bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", refresh=False)
                if self.window and (step % self.config.run.log_every == 0 or step == end):
                    self._log_train(step, self.window)
                    self.window.clear()
                epoch_end = step % steps_per_epoch == 0
                eval_due = self.config.run.eval_every and step % self.config.run.eval_every == 0
                if epoch_end or eval_due:
                    self.validate()
                    self.save()
                if step >= end:
                    break

    def _log_train(self, step: int, window: list[StepResult]) -> None:
        """Mean loss over the steps since the last record, and the latest learning rate."""
        if self.log is not None:
            values = {
                "loss": sum(r.loss for r in window) / len(window),
                "lr": window[-1].lr,
                "epoch": round(step / self.sampler.steps_per_epoch, 4),
            }
            self.log.write("train", step, values)

    def _finish(self) -> TrainSummary:
        summary = self.summary
        summary.steps = self.progress.step
        summary.stopped_early = self.progress.step < self.total_steps
        summary.skipped_videos = list(self.progress.skipped_videos)
        summary.last_checkpoint = str(self.output / LAST)
        summary.best_weights = str(self.output / BEST) if (self.output / BEST).is_file() else None
        if self.log is not None:
            self.log.write("summary", self.progress.step, _summary_record(summary))
            self.log.close()
        return summary


def _summary_record(summary: TrainSummary) -> dict[str, Any]:
    record = dataclasses.asdict(summary)
    record.pop("losses")
    record.pop("last_val")
    return record


def _resume_differences(saved: TrainConfig, current: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{"optim.lr": (checkpoint value, current value)}`` for settings that must not change."""
    compared = {
        "model": (dataclasses.asdict(saved.model), dataclasses.asdict(current.model)),
        "optim": (dataclasses.asdict(saved.optim), dataclasses.asdict(current.optim)),
        "data": (
            {name: getattr(saved.data, name) for name in RESUME_DATA_KEYS},
            {name: getattr(current.data, name) for name in RESUME_DATA_KEYS},
        ),
    }
    return {
        f"{section}.{name}": (then[name], now[name])
        for section, (then, now) in compared.items()
        for name in then
        if then[name] != now[name]
    }


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """With ``enabled``, deterministic kernels where torch has them (a warning where it has none) and
    a fixed cuBLAS workspace, for bitwise-repeatable GPU runs; the previous setting comes back after."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS first starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def train(config: TrainConfig, resume: bool = False, data: TrainData | None = None, source: str = "config") -> TrainSummary:
    """Train (or, with ``resume``, continue) the run ``config`` describes.

    Args:
        config: a checked config (see :func:`tempme_train.config.load_config`).
        resume: continue from ``<run.output_dir>/last``; otherwise that folder must not hold a run.
        data: datasets to use instead of the ones the config names (tests, custom pipelines).
        source: where the config came from, for error messages.

    Returns:
        A :class:`TrainSummary`. Raises ConfigError / FileNotFoundError / ValueError before the
        first step when the config, the data or the output folder cannot be used.
    """
    try:
        return _train(config, resume, data, source)
    except ConfigError as error:
        # Checks below know the config file only; the value may come from an override or an option.
        raise config.blame(error) from None


def _train(config: TrainConfig, resume: bool, data: TrainData | None, source: str) -> TrainSummary:
    # Checked before anything starts (the process group included); the Trainer resolves it again.
    use_cuda = resolve_device(config.run.device, world_from_env(), source).type == "cuda"
    # Leave a process group that the caller created (e.g. a test harness) for the caller to close.
    group_existed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = init_distributed(use_cuda)
    try:
        with deterministic_algorithms(config.run.deterministic):
            if config.optim.batch_size % world.world_size:
                raise ConfigError(
                    source, "optim.batch_size", config.optim.batch_size,
                    f"the global batch must split evenly over {world.world_size} processes",
                )
            return Trainer(config, world, resume, data, source).run()
    finally:
        if world.distributed and not group_existed:
            shutdown()
