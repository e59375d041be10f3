"""The training loop: contrastive fine-tuning of TempMe with the paper's recipe (SPEC section 6).

One call, :func:`train`, runs a whole (or resumed) run from a :class:`TrainConfig`:

1. check everything before the first step: device, output folder, annotations, video files, model;
2. train with AdamW + warmup/cosine, gradient clipping and optional bf16/fp16 autocast, over the
   global batch shared by all processes (see ``distributed.py`` for how gradients are combined);
3. validate every ``run.eval_every`` steps and at each epoch end on the validation split, keeping
   ``best.safetensors`` (highest text-to-video R@1) and a resumable ``last/`` checkpoint;
4. on Ctrl-C, SIGTERM or an error, write ``last/`` at the last completed step before stopping
   (not when the loss diverged: those parameters are worth nothing). With several processes, an
   error or a signal on one of them stops all of them at the same point (``failures_shared``,
   :func:`stops_held`), so that none waits in a collective for another that has gone.

Outputs in ``run.output_dir``: ``config.yaml``, ``metrics.jsonl``, ``best.safetensors`` (with
``data.val_split=none``: ``weights.safetensors``, the final weights), ``last/`` and optionally
``tensorboard/``. Launch several processes with ``torchrun``: each validates on its
share of the videos; rank 0 logs and writes files while the others wait.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import signal
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tempme import TempMe, devices
from tempme.config import CLIPConfig
from tempme.data import SkippedVideo, stop_workers
from tempme.files import check_folder, describe_os_error, remove_stale_temporaries
from tempme.precision import autocast
from tempme.progress import print_above_bars, progress_bar
from tempme.retrieval import contrastive_loss
from tempme.signals import Terminated, handlers_replaced, sigterm_raises
from tempme.userwarnings import SharedWarning, warn

from .checkpoint import (
    CONFIG,
    Progress,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .config import (
    SETTINGS_ADDED,
    ConfigError,
    ProcessConfigError,
    ScheduleOverrides,
    TrainConfig,
    check_schedule_is_read,
    load_run_config,
    save_config,
    setting_value,
    with_settings,
)
from .data import (
    EpochSampler,
    TrainData,
    make_train_loader,
    prepare_training_data,
    training_captions_digest,
    training_set_identity,
)
from .distributed import (
    WorldInfo,
    all_gather_objects,
    all_gather_with_grad,
    all_reduce_gradients,
    broadcast_parameters,
    failures_shared,
    lost_another_process,
    process_group,
    world_from_env,
)
from .evaluate import eval_set_identity, evaluate
from .modeling import (
    BEST,
    LAST,
    WEIGHTS,
    base_fingerprint,
    build_model,
    built_schedule,
    check_base,
    check_preset_matches_weights,
    check_schedule,
    recorded_model_config,
    save_trained_weights,
    trainable_parameters,
)
from .optim import build_optimizer, build_scheduler
from .tracking import METRICS_FILE, MetricsLog, require_tensorboard

# Settings a resumed run must share with the checkpoint: they change what the steps compute.
RESUME_DATA_KEYS = (
    "dataset", "train_split", "val_split", "holdout_videos", "max_words", "max_frames", "framerate",
    "image_size", "augment",
)

# Why a setting that may look free to change on --resume is not.
RESUME_NOTES = {
    "data.frame_cache": " (RandAugment then works on other frames, the cached ones already resized, so the "
                        "steps would differ; a cache that moved may be given by its new folder)",
}


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
    # Written only when there is no validation set (so no best.safetensors): the finished run's weights.
    final_weights: str | None = None
    last_checkpoint: str | None = None
    skipped_videos: list[str] = field(default_factory=list)
    missing_videos: list[str] = field(default_factory=list)
    # Validation videos that could not be decoded (left out of validation), as of the last validation.
    skipped_val_videos: list[str] = field(default_factory=list)


class StopShared(KeyboardInterrupt):
    """Ctrl-C or SIGTERM reached one of several processes; all of them stop after the same step."""


class TerminationShared(StopShared, Terminated):
    """:class:`StopShared` on a process that SIGTERM reached itself (the command exits as SIGTERM's)."""


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; ``last/`` is left as it was (see :meth:`Trainer.step`)."""


class NoTrainingData(ValueError):
    """No step had a single decodable training sample: nothing can be learnt."""


class TrainingStopped(ValueError):
    """Why training stopped (bad input: a ValueError or OSError; or another process gone) and where
    the run stands, in one line, so that the command line prints it as one; the original error is
    its ``__cause__``."""


@dataclass(frozen=True)
class UnreadBatch:
    """Stands for a batch whose reading raised ``error`` (a video only this process reads can be
    undecodable under ``data.strict``, or gone): :func:`compute_gradients` raises it where every
    process learns of it."""

    error: Exception


@dataclass(frozen=True)
class StepResult:
    """``loss``: the global-batch loss (``None`` when the batch had no sample); ``lr``: the rate used."""

    loss: float | None
    lr: float


def run_device(name: str, world: WorldInfo, source: str = "config") -> torch.device:
    """``run.device`` for this process (``auto`` and ``cuda`` are ``cuda:LOCAL_RANK``), or a ConfigError
    naming it where this machine lacks that device (see :func:`tempme.devices.resolve_device`)."""
    try:
        return devices.resolve_device(name, world.local_rank, kinds=("cpu", "cuda", "mps"))
    except devices.DeviceUnavailable as error:
        kind = ProcessConfigError if isinstance(error, devices.NoDeviceForProcess) else ConfigError
        raise kind(source, "run.device", name, str(error)) from None


@contextlib.contextmanager
def stops_held(hold: bool = True):
    """With ``hold``, Ctrl-C and SIGTERM are recorded in the yielded list instead of acted on until
    the block ends; then the first is delivered, unless the block raised (it stops the run anyway).

    Used (1) around each optimizer update: stopped half-way, some parameters would hold the new step
    and others the old one while the step counter says neither, and the checkpoint written on the
    interrupt would match no step; (2) in a multi-process run, around the whole loop:
    :meth:`Trainer.step` shares held signals with the other processes, so that all stop after the
    same step. Stopped at once, a process could leave the others blocked in a collective it never
    joins: with NCCL, rank 0 among them, unable to save. Validation is held too (the checkpoint is
    written before it, so if torchrun kills the processes during it, nothing is lost). What
    :func:`handlers_replaced` leaves as it is is not held.
    """
    received: list[int] = []
    if not hold:
        yield received
        return
    with handlers_replaced(lambda signum, frame: received.append(signum)):
        yield received
    if received:
        signal.raise_signal(received[0])  # to the handler that was there: KeyboardInterrupt for Ctrl-C


def check_processes_agree(states: list[tuple[int, Any, int, tuple[int, int, str] | None]]) -> None:
    """Raise on every process unless all of them (``states`` in rank order: training pairs, their
    digests, the step resumed from, :func:`eval_set_identity` of the validation set) start from the
    same data and step."""
    if any(state != states[0] for state in states):
        described = "; ".join(
            f"rank {rank}: {size} pairs, {val[0] if val else 0} validation videos, step {step}"
            for rank, (size, _, step, val) in enumerate(states)
        )
        raise ValueError(
            f"the training processes do not see the same data or checkpoint ({described}): every node "
            "must have the same annotation files, videos and output folder"
        )


@contextlib.contextmanager
def signals_ignored():
    """Ctrl-C and SIGTERM do nothing while the block runs: the save after a stop must not itself be
    stopped by the next signal (torchrun and batch schedulers often send one to every process)."""
    with handlers_replaced(signal.SIG_IGN):
        yield


def compute_gradients(
    model: TempMe,
    batch: dict[str, Any] | UnreadBatch | None,
    params: list[torch.nn.Parameter],
    device: torch.device,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    gradient_divisor: float = 1.0,
) -> float | None:
    """Forward this process's batch, compute the loss over the global batch and backpropagate.

    ``model`` may be the ``torch.compile`` wrapper of the model (``run.compile``): it shares the
    parameters and forwards attribute access.

    Afterwards ``params`` hold the gradient of the global-batch loss (summed over processes) divided
    by ``gradient_divisor`` (``optim.gradient_divisor``), scaled by ``scaler`` if given. ``batch`` is
    ``None`` when all its videos were undecodable; the process still takes part in the collectives. An :class:`UnreadBatch` error is raised here, where every
    process learns of it (:func:`failures_shared`) and stops too.

    Returns:
        The global-batch loss, or ``None`` when the global batch has no sample at all.
    """
    with failures_shared():  # before the first collective: a process that failed would never reach it
        if isinstance(batch, UnreadBatch):
            raise batch.error
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
    with failures_shared():  # the backward pass is where a GPU runs out of memory
        loss = contrastive_loss(text, video, model.logit_scale)
        if loss.requires_grad:  # False on a process whose own batch was empty
            divided = loss / gradient_divisor
            (scaler.scale(divided) if scaler is not None else divided).backward()
    all_reduce_gradients(params)
    return loss.item()


def validation_line(step: int, total_steps: int, results: dict[str, Any], best: bool) -> str:
    """One line for a validation's results, printed while training runs (metrics.jsonl has them all)."""
    t2v, v2t = results["t2v"], results["v2t"]
    recalls = " ".join(f"R@{k} {t2v[f'R{k}']:.1f}" for k in (1, 5, 10))
    note = " (best so far)" if best else ""
    return f"validation at step {step}/{total_steps}: text-to-video {recalls}, video-to-text R@1 {v2t['R1']:.1f}{note}"


class Trainer:
    """Holds one run's model, optimizer, data and progress; :meth:`run` trains to the end."""

    def __init__(self, config: TrainConfig, world: WorldInfo, resume: bool, data: TrainData | None, source: str):
        self.config, self.world = config, world
        self.output = Path(config.run.output_dir)
        with failures_shared():  # each process checks its own device, files and data
            self.device = run_device(config.run.device, world, source)
            if world.is_main:
                origin = config.source_of("run.output_dir", source)  # --output, an override or a file
                check_folder(self.output, origin if origin.startswith("--") else f"{origin}: run.output_dir")
            checkpoint = self._check_output(resume, source)
            if world.is_main:  # what a killed save left (an hour old: a save in flight is not, whoever's)
                for target in (LAST, BEST, WEIGHTS, CONFIG, METRICS_FILE):
                    remove_stale_temporaries(self.output / target, older_than_s=3600)
            config, optim = self.config, self.config.optim  # a resumed old run may have had settings added
            if checkpoint is None:
                check_schedule_is_read(config, source)
            check_schedule(config, source)  # before the data and the weights are read
            if config.run.tensorboard:
                require_tensorboard(source)
            self.data = data if data is not None else prepare_training_data(config, source)
            _check_validation_set(self.data)
            self.sampler = EpochSampler(len(self.data.train), optim.batch_size, world.world_size, world.rank, optim.seed)
            model = build_model(config, source)
            if checkpoint is None and config.model.weights:
                check_preset_matches_weights(model, config, source)
            # Recorded in adapters-only files, so they are never applied to another backbone; the
            # backbone does not train, so one digest serves the whole run.
            self.base_fingerprint = base_fingerprint(model) if config.model.trainable == "lora" else None
            self.model = model.to(self.device)
            self.params = list(trainable_parameters(self.model).values())
            if not self.params:
                raise config.blame(ConfigError(
                    source, "model.lora_rank", config.model.lora_rank,
                    f"nothing to train: no LoRA, and no clip positional embeddings (model.method={config.model.method}, "
                    f"model.schedule.clip_pos_embed={model.config.merge.clip_pos_embed}); set model.lora_rank above 0 "
                    "or model.trainable=full",
                ))
            self.total_steps = self.sampler.steps_per_epoch * optim.epochs
            self.optimizer = build_optimizer(self.params, optim.lr, optim.betas, optim.eps, optim.weight_decay)
            self.scheduler = build_scheduler(self.optimizer, self.total_steps, optim.warmup)
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=optim.precision == "fp16")
            self.progress = Progress()
            train_size, train_digest = training_set_identity(self.data.train)
            captions_digest = training_captions_digest(self.data.train)
            if checkpoint is not None:
                # Adapters trained on another backbone would resume as if nothing had changed.
                check_base(self.model, checkpoint / WEIGHTS, config.model.weights or f"the random {config.model.preset}")
                self.progress = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler, self.scaler)
                _check_same_training_set(self.progress, train_size, train_digest, captions_digest, checkpoint)
        # Each process built its own data and read the checkpoint itself: if they disagree (videos
        # missing on one node), their collectives would wait on each other for good.
        val = eval_set_identity(self.data.val) if self.data.val is not None else None
        digests = (train_digest, captions_digest)
        check_processes_agree(all_gather_objects((train_size, digests, self.progress.step, val)))
        broadcast_parameters(self.params)  # a fresh run's random LoRA weights must start out equal
        # The compiled wrapper shares the model's parameters; only the training forward goes through it.
        self.forward_model = torch.compile(self.model, dynamic=False) if config.run.compile else self.model
        self.loader = make_train_loader(
            self.data.train, self.sampler, config.data.num_workers, pin_memory=self.device.type == "cuda"
        )
        self.progress.train_size, self.progress.train_digest = train_size, train_digest
        self.progress.train_captions_digest = captions_digest
        self.saved_step = self.progress.step  # the step last/ holds
        self.log = None
        with failures_shared():
            if world.is_main:
                self.output.mkdir(parents=True, exist_ok=True)
                save_config(config, self.output / CONFIG)
                self.log = MetricsLog(self.output, config.run.tensorboard, start_step=self.progress.step)
        self.summary = TrainSummary(  # steps and stopped_early: as the run ends
            output_dir=str(self.output), steps=self.progress.step, total_steps=self.total_steps, stopped_early=False,
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
            # A run whose last/ was removed (to save space, say) still has trained weights that a new run
            # would overwrite. (A run stopped before its first checkpoint left only its config and
            # metrics: starting again over them loses nothing.)
            weights = [name for name in (BEST, WEIGHTS) if (self.output / name).exists()]
            if weights:
                raise ValueError(
                    f"{self.output} holds the trained weights of another run ({', '.join(weights)}) and no "
                    "checkpoint to resume from; choose another output folder, or move them away first"
                )
            return None
        if checkpoint is None:
            raise FileNotFoundError(f"cannot resume: no checkpoint in {self.output / LAST}")
        # Paths relative to where the run started, as an older run stored them, compare as they are made now.
        saved = with_absolute_data_paths(load_run_config(checkpoint / CONFIG))
        # A run from before a setting existed goes on as it started, at this resume and every later
        # one, unless this run asks otherwise on the command line (then refused below, as any change).
        defaults, kept = TrainConfig(), {}
        for key, before in SETTINGS_ADDED.items():
            now = setting_value(self.config, key)
            asked = self.config.source_of(key, "").startswith("command-line override")
            if setting_value(saved, key) == before and now == setting_value(defaults, key) != before and not asked:
                kept[key] = before
        if kept:
            self.config = with_settings(self.config, kept, f"{checkpoint / CONFIG} (a run from before these settings)")
            shown = ", ".join(f"{key}={value}" for key, value in kept.items())
            warn(f"{checkpoint} was trained with {shown}, as every run was before {', '.join(kept)} existed: "
                 "the run goes on with it", SharedWarning)
        # The architecture the run was built on, as the checkpoint records it (the config may name only weights).
        recorded = recorded_model_config(checkpoint / WEIGHTS)
        differences = _resume_differences(saved, self.config, recorded.clip if recorded else None)
        if differences:
            key, (then, now) = next(iter(differences.items()))
            note = RESUME_NOTES.get(key, "")
            raise ConfigError(
                source, key, now,
                f"differs from the checkpoint's value {then!r}; a resumed run must keep "
                f"{', '.join(differences)} as in {checkpoint / CONFIG}{note}",
            )
        return checkpoint

    # --- one step ---------------------------------------------------------------------------

    def step(self, batch: dict[str, Any] | UnreadBatch | None, held_signals: list[int] | None = None) -> StepResult:
        """One optimizer step on the global batch; its loss joins ``window`` (the steps not yet logged).

        Raises TrainingDiverged, before updating anything, when the loss is not finite; StopShared
        after the step when a stop signal was held back (``held_signals``, see :func:`stops_held`)
        on this or another process.
        """
        if isinstance(batch, dict):
            self._note_skipped(batch["skipped"])
            if "video" not in batch:  # every video of the batch was undecodable (see data.collate_train)
                batch = None
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        optim = self.config.optim
        loss = compute_gradients(
            self.forward_model, batch, self.params, self.device, optim.precision, self.scaler, optim.gradient_divisor
        )
        # The loss is the global batch's, so every process stops here alike. Later steps could only
        # spread the NaN into every parameter, and validation would fail an epoch later.
        if loss is not None and not math.isfinite(loss):
            raise self._diverged(f"the loss at step {self.progress.step + 1}/{self.total_steps} is {loss}")
        with stops_held():  # all of the update and its record, or none of it
            # Signals from here on (held by this block) are shared at the next step.
            signal_here = bool(held_signals)
            # The optimizer's state, made at the first update, can exhaust one GPU's memory.
            with failures_shared(signal_here) as shared:
                if loss is not None:
                    self._update()
            # The schedule advances even on an empty batch, so it stays tied to the data position. (Also
            # when fp16 loss scaling skipped the optimizer step for overflowing gradients, which torch
            # warns about as if the calls were out of order: they are not.)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                self.scheduler.step()
            self.progress.step += 1
            if loss is not None and self.progress.steps_with_data is not None:
                self.progress.steps_with_data += 1
            result = StepResult(loss, lr)
            if loss is not None:
                self.window.append(result)
                self.summary.losses.append(loss)
        if shared.stop_requested:  # by this process or another
            if not signal_here:
                raise StopShared("Ctrl-C or SIGTERM reached another process")
            name = signal.Signals(held_signals[0]).name
            kind = TerminationShared if held_signals[0] == signal.SIGTERM else StopShared
            raise kind(f"{name} reached this process")
        return result

    def _note_skipped(self, videos: list[SkippedVideo]) -> None:
        """Record the undecodable videos of a batch, warning about each the first time this process
        meets it in the run: it is read again at every caption and epoch, and stays undecodable."""
        for video in videos:
            if video.video_id not in self._local_skipped:
                warn(f"skipping video {video.video_id!r} for the rest of the run: cannot decode {video.path}: "
                     f"{video.reason}")
                self._local_skipped.add(video.video_id)

    def _update(self) -> None:
        if self.config.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.grad_clip)
            # A finite loss can still have NaN gradients, which the update would spread into the
            # weights (and last/). With fp16 loss scaling an overflow is expected now and then: the
            # scaler skips that update itself.
            if not self.scaler.is_enabled() and not torch.isfinite(norm):
                raise self._diverged(f"the gradient norm at step {self.progress.step + 1}/{self.total_steps} is {norm.item()}")
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _check_weights_finite(self) -> None:
        """Raise TrainingDiverged where an update left weights that are not finite (a finite loss and
        gradient norm can give them, with a huge learning rate): they are never validated or saved,
        and ``last/`` keeps the step it holds. The same on every process: their weights are equal."""
        if not self._weights_finite():
            raise self._diverged(f"the trained weights are not finite by step {self.progress.step}")

    def _weights_finite(self) -> bool:
        return bool(torch.stack([param.isfinite().all() for param in self.params]).all())

    def _diverged(self, what: str) -> TrainingDiverged:
        optim = self.config.optim
        advice = "lower optim.lr"
        if optim.precision == "fp16":
            advice += " or use optim.precision=bf16 or fp32 (fp16 overflows easily)"
        kept = (
            f"{self.output / LAST} still holds step {self.saved_step}" if self.saved_step > 0
            else "no checkpoint was written"
        )
        return TrainingDiverged(
            f"training diverged: {what} "
            f"(optim.lr={optim.lr}, optim.precision={optim.precision}); {advice} and start a new run "
            f"(--resume keeps the settings); {kept}"
        )

    def _check_some_data(self) -> None:
        """Raise NoTrainingData when no step so far had a decodable sample (on every process alike:
        the count follows the global-batch loss)."""
        if self.progress.steps_with_data != 0:  # None: not recorded by the checkpoint resumed from
            return
        skipped = sorted(set().union(*all_gather_objects(sorted(self._local_skipped))))
        shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        raise NoTrainingData(
            f"no training data: every video read in the {self.progress.step} steps so far was undecodable "
            f"({len(skipped)} videos: {shown}); replace or re-encode them (tempme prepare lists them) "
            "or check data.video_dir"
        )

    # --- validation and checkpoints -------------------------------------------------------------

    def validate_and_save(self) -> None:
        """Validate and write ``last/``; until both are done, ``last/`` records the validation as due."""
        self.progress.validation_due = True  # saved as such if the run stops in between
        # Stops are held during validation (stops_held): torchrun may kill the processes. And before
        # the first best.safetensors, a checkpoint: a run stopped there can be resumed, where best
        # weights without one would bar both resuming and starting again.
        if self.data.val is not None and (self.world.distributed or not self.saved_step):
            self.save()
        self.validate()
        self.progress.validation_due = False
        self.save()

    def validate(self) -> None:
        """Evaluate the validation split (each process its share) and keep ``best.safetensors`` (rank 0)."""
        if self.data.val is None:
            return
        self._check_weights_finite()
        # Validation's bars would nest under the training bar, which tqdm draws with cursor-up
        # codes: fine on a terminal, garbage in a log file. There the training bar is enough.
        results = evaluate(
            self.model, self.data.val, self.config.run.eval_batch_size, self.device,
            self.config.optim.precision, self.config.data.num_workers,
            progress=self.config.run.progress and sys.stderr.isatty(),
        )
        r1, mean_rank = results["t2v"]["R1"], results["t2v"]["MnR"]
        self.summary.last_val = results
        best = is_better(r1, mean_rank, self.progress.best_r1, self.progress.best_mean_rank)
        if self.world.is_main:  # a result, not progress: printed without the bar too
            print_above_bars(validation_line(self.progress.step, self.total_steps, results, best))
        with failures_shared():  # the others wait for rank 0's files, and stop if writing them fails
            if best:
                # The file first: interrupted in between, progress still names the previous best.
                if self.world.is_main:
                    save_trained_weights(self.model, self.output / BEST, self.config, self.base_fingerprint)
                self.progress.best_r1, self.progress.best_mean_rank = r1, mean_rank
                self.progress.best_step = self.progress.step
            if self.world.is_main:
                # Last: stopped before this, the validation is run again on --resume, and logged once.
                self.log.write("val", self.progress.step, {"t2v": results["t2v"], "v2t": results["v2t"]})
        self.summary.best_val_r1, self.summary.best_step = self.progress.best_r1, self.progress.best_step
        self.model.train()

    def save(self) -> None:
        """Write ``last/`` (rank 0), after collecting every process's skipped videos."""
        self._check_weights_finite()
        skipped = set().union(*all_gather_objects(sorted(self._local_skipped)))
        self.progress.skipped_videos = sorted(skipped)
        with failures_shared():
            if self.world.is_main:
                self._write_last()
        self.saved_step = self.progress.step  # on every process: they decide alike whether to save

    def _write_last(self) -> None:
        save_checkpoint(
            self.output / LAST, self.model, self.config, self.optimizer, self.scheduler, self.scaler,
            self.progress, self.sampler.steps_per_epoch, self.base_fingerprint,
        )

    def save_stopped(self, cause: BaseException | None = None) -> str | None:
        """On Ctrl-C, SIGTERM or an error: rank 0 writes ``last/`` at the last completed step.

        No collectives: the other processes are being stopped too, so waiting for them could hang.
        Their parameters equal rank 0's after every step; only their skipped-video lists are left out.
        (A step stopped part-way has not touched the parameters: the update itself is protected by
        :func:`stops_held`, and errors come from reading data or computing the loss.)

        Returns:
            What to tell the user (``None`` on other processes and before the first step, where a
            checkpoint would only make the next start need --resume).
        """
        step = self.progress.step
        if not self.world.is_main or step == 0:
            return None
        if self.saved_step != step:
            kept = (f"it still holds step {self.saved_step}, to continue from with --resume" if self.saved_step
                    else "there is none")
            if not self._weights_finite():
                return f"did not save {self.output / LAST} at step {step}: its weights are not finite; {kept}"
            self.progress.skipped_videos = sorted(set(self.progress.skipped_videos) | self._local_skipped)
            try:
                self._write_last()
            except Exception as error:  # noqa: BLE001 - e.g. a full disk; the first error matters more
                # Often what stopped the run (``cause``: a full disk), said once already.
                why = "the same error" if cause is not None and str(error) == str(cause) else error
                return f"could not save {self.output / LAST} at step {step} ({why}); {kept}"
            self.saved_step = step
        due = " (its validation still due: it runs first)" if self.progress.validation_due else ""
        return f"saved {self.output / LAST} at step {step}/{self.total_steps}{due}; continue with --resume"

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> TrainSummary:
        stop_after = self.config.run.stop_after
        end = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        bar = progress_bar(
            total=self.total_steps, initial=self.progress.step, desc="training", unit="step",
            disable=not (self.world.is_main and self.config.run.progress),
        )
        with sigterm_raises():
            try:
                with stops_held(self.world.distributed) as received:
                    if self.progress.validation_due:  # the session that reached this step stopped during it
                        self.validate_and_save()
                    self._train_until(end, bar, received)
                    if self.saved_step != self.progress.step:
                        self.save()
                    # Held since the last step's update, a signal has no step left to stop after:
                    # every process finishes alike, the run saved.
                    received.clear()
            except BaseException as error:
                with signals_ignored():
                    bar.close()
                    if self.window:
                        try:
                            self._log_train(self.progress.step, self.window)
                        except Exception as log_error:  # noqa: BLE001 - e.g. the full disk that stopped training
                            print(f"could not log the last steps ({log_error})", file=sys.stderr)
                    try:
                        self._stopped(error)  # raises
                    finally:
                        if self.log is not None:
                            self.log.close()  # flushes TensorBoard's records of the steps just logged
        bar.close()
        self._save_final_weights()
        return self._finish()

    def _stopped(self, error: BaseException) -> None:
        """Save what can be saved after ``error`` stopped the loop, say so, and raise."""
        if isinstance(error, (TrainingDiverged, NoTrainingData)):
            raise error  # nothing worth keeping since the last checkpoint; the message says what is left
        if isinstance(error, KeyboardInterrupt):
            how = "terminated (SIGTERM)" if isinstance(error, Terminated) else "interrupted"
            if isinstance(error, StopShared):
                how = f"stopped ({error})"
            if self.world.is_main and self.progress.step == 0:
                print(f"training {how} before the first step; nothing to save", file=sys.stderr)
            saved = self.save_stopped(error)
            if saved is not None:
                print(f"training {how} after step {self.progress.step}/{self.total_steps}: {saved}", file=sys.stderr)
            raise error
        saved = self.save_stopped(error)
        if self.world.distributed and lost_another_process(error):
            # One line rather than the backend's traceback, which names a socket, not a process.
            words = str(error).splitlines()[0].split(". ")[0]
            if saved is None and self.saved_step:  # rank 0 saves; this process knows what it last saved
                saved = f"{self.output / LAST} holds step {self.saved_step} if process 0 wrote it; continue with --resume"
            where = f" (training stopped: {saved})" if saved else ""
            raise TrainingStopped(f"another training process stopped answering (killed, out of memory, or its "
                                  f"node went down): {words}{where}") from error
        if saved is None:
            raise error
        if isinstance(error, (ValueError, OSError)):
            # Bad input (an undecodable video under data.strict, a full disk): the command line prints
            # a ValueError as one line, so where the run stands goes on that line.
            reason = describe_os_error(error) if isinstance(error, OSError) else error
            then = " once that is fixed" if self.saved_step else ""  # a checkpoint to resume from
            raise TrainingStopped(f"{reason} (training stopped: {saved}{then})") from error
        print(f"training stopped by an error after step {self.progress.step}/{self.total_steps}: {saved}", file=sys.stderr)
        raise error

    def _save_final_weights(self) -> None:
        """A finished run without validation has no best.safetensors: keep its final weights beside
        last/ instead, so the run folder itself can be evaluated (``tempme eval --checkpoint RUN``)."""
        if self.data.val is None and self.world.is_main and self.progress.step == self.total_steps:
            save_trained_weights(self.model, self.output / WEIGHTS, self.config, self.base_fingerprint)

    def _train_until(self, end: int, bar, received: list[int]) -> None:
        """Steps, with logging, validation and checkpoints as they fall due, until step ``end``.

        ``received``: the stop signals held back (see :func:`stops_held`), shared at each step.
        """
        steps_per_epoch = self.sampler.steps_per_epoch
        while self.progress.step < end:
            self.sampler.set_epoch(self.progress.epoch(steps_per_epoch), self.progress.batch_in_epoch(steps_per_epoch))
            batches = self._batches()
            try:
                for batch in batches:
                    result = self.step(batch, received)
                    step = self.progress.step
                    bar.update(1)
                    if result.loss is not None:
                        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", refresh=False)
                    if self.window and (step % self.config.run.log_every == 0 or step == end):
                        with failures_shared():  # rank 0 writes: a full disk there must stop every process
                            self._log_train(step, self.window)
                        self.window.clear()
                    epoch_end = step % steps_per_epoch == 0
                    if epoch_end or step >= end:
                        # A whole epoch without a decodable sample: every later one is the same.
                        self._check_some_data()
                    eval_due = self.config.run.eval_every and step % self.config.run.eval_every == 0
                    if epoch_end or eval_due:
                        self.validate_and_save()
                    if step >= end:
                        break
            finally:
                # The loader's workers end here, also when a stop or an error ends the epoch. Left to
                # garbage collection (the error's traceback holds the loader), they outlived the run,
                # and Python's exit waited on them forever (they leave stops to this process).
                batches.close()

    def _batches(self):
        """The loader's batches, or in place of one an :class:`UnreadBatch` with the error reading it raised.

        :meth:`step` raises it again where every process learns of it: a video that one process
        alone reads can be undecodable (``data.strict``) or gone.
        """
        try:
            batches = iter(self.loader)  # starts the loader's worker processes
        except Exception as error:  # noqa: BLE001 - raised again by step()
            yield UnreadBatch(error)
            return
        try:
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except Exception as error:  # noqa: BLE001 - raised again by step()
                    batch = UnreadBatch(error)
                yield batch
        finally:
            stop_workers(batches)

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
        summary.skipped_val_videos = list((summary.last_val or {}).get("skipped", []))
        summary.last_checkpoint = str(self.output / LAST)
        summary.best_weights = str(self.output / BEST) if (self.output / BEST).is_file() else None
        summary.final_weights = str(self.output / WEIGHTS) if (self.output / WEIGHTS).is_file() else None
        if self.log is not None:
            self.log.write("summary", self.progress.step, _summary_record(summary))
            self.log.close()
        return summary


def is_better(r1: float, mean_rank: float, best_r1: float | None, best_mean_rank: float | None) -> bool:
    """Whether a validation with text-to-video ``r1`` and ``mean_rank`` beats the best so far: a higher
    R@1 (the paper's criterion), or the same R@1 with a lower mean rank (R@1 takes few values on a
    small validation set, where ties would keep the first weights that reached it)."""
    if best_r1 is None:
        return True
    if r1 != best_r1:
        return r1 > best_r1
    return best_mean_rank is not None and mean_rank < best_mean_rank


def _check_validation_set(data: TrainData) -> None:
    """A validation set without a video or a caption would fail only at the first epoch end."""
    val = data.val
    if val is not None and not (val.video_ids and val.captions):
        raise ValueError(
            f"nothing to validate on: the validation set {val.name} has {len(val.video_ids)} videos and "
            f"{len(val.captions)} captions; at least one of each is needed"
        )


def _check_same_training_set(
    progress: Progress, size: int, digest: str | None, captions_digest: str | None, checkpoint: Path
) -> None:
    """Refuse to resume on another training set: the steps index into it, so the epochs, the batch
    order and the learning-rate schedule would change without a word."""
    remedy = "restore the training data as it was, or start a new run in another output folder"
    if progress.train_size is not None and progress.train_size != size:
        raise ValueError(
            f"cannot resume: the training set now has {size} (video, caption) pairs, {checkpoint} was "
            f"trained on {progress.train_size} (videos added, removed or missing?); {remedy}"
        )
    if progress.train_digest is not None and digest is not None and progress.train_digest != digest:
        raise ValueError(
            f"cannot resume: the training set has the {size} pairs {checkpoint} was trained on, but of other "
            f"videos; {remedy}"
        )
    recorded = progress.train_captions_digest
    if recorded is not None and captions_digest is not None and recorded != captions_digest:
        raise ValueError(
            f"cannot resume: the training set has the videos {checkpoint} was trained on, but other captions "
            f"(the annotation file was edited?); {remedy}"
        )


def _summary_record(summary: TrainSummary) -> dict[str, Any]:
    record = dataclasses.asdict(summary)
    record.pop("losses")
    record.pop("last_val")
    return record


def _resume_differences(
    saved: TrainConfig, current: TrainConfig, clip: CLIPConfig | None
) -> dict[str, tuple[Any, Any]]:
    """``{"optim.lr": (checkpoint value, current value)}`` for settings that must not change; schedule
    settings as the models use them on the architecture ``clip`` (see :func:`_schedule_differences`)."""
    model_then, model_now = dataclasses.asdict(saved.model), dataclasses.asdict(current.model)
    del model_then["schedule"], model_now["schedule"]
    compared = {
        "model": (model_then, model_now),
        "optim": (dataclasses.asdict(saved.optim), dataclasses.asdict(current.optim)),
        "data": (
            {name: getattr(saved.data, name) for name in RESUME_DATA_KEYS},
            {name: getattr(current.data, name) for name in RESUME_DATA_KEYS},
        ),
    }
    differences = {
        f"{section}.{name}": (then[name], now[name])
        for section, (then, now) in compared.items()
        for name in then
        if then[name] != now[name]
    }
    # RandAugment on a frame cache works on its frames, already resized: not the same steps as without
    # one (unaugmented, cached frames give the same tensors). The folder itself may move: the cache
    # checks its own sampling settings.
    if current.data.augment and bool(saved.data.frame_cache) != bool(current.data.frame_cache):
        differences["data.frame_cache"] = (saved.data.frame_cache, current.data.frame_cache)
    return {**differences, **_schedule_differences(saved, current, clip)}


def _schedule_differences(saved: TrainConfig, current: TrainConfig, clip: CLIPConfig | None) -> dict[str, tuple[Any, Any]]:
    """The schedule settings whose value differs in the model each config builds on ``clip``: one
    given as the value the run uses already (the paper's, left unset when it started) changes nothing.
    Where a schedule cannot be worked out (no architecture recorded), the settings as given."""
    then, now = saved.model.schedule.as_kwargs(), current.model.schedule.as_kwargs()
    if then == now:
        return {}
    built = (built_schedule(saved, clip), built_schedule(current, clip)) if clip is not None else (None, None)
    if None not in built:
        then, now = (dataclasses.asdict(merge) for merge in built)
    names = [field.name for field in dataclasses.fields(ScheduleOverrides)]
    return {f"model.schedule.{name}": (then.get(name), now.get(name)) for name in names if then.get(name) != now.get(name)}


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


def with_absolute_data_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with relative data paths (``data.anno_path``, ``data.video_dir``, ``data.frame_cache``)
    and a relative ``model.weights`` file made absolute, from the working directory: the config stored
    with the run (``config.yaml``, and inside its weights) then finds them from anywhere, as
    ``tempme eval --checkpoint`` needs."""
    changes = {
        name: str(Path(value).absolute())  # not resolved: a linked data folder may be pointed elsewhere later
        for name in ("anno_path", "video_dir", "frame_cache")
        if (value := getattr(config.data, name)) and not Path(value).expanduser().is_absolute()
    }
    weights = config.model.weights
    relative_weights = bool(weights) and not Path(weights).is_absolute() and Path(weights).exists()  # not a preset
    if not changes and not relative_weights:
        return config
    absolute = copy.copy(config)  # keeps where each setting came from, for error messages
    absolute.data = dataclasses.replace(config.data, **changes)
    if relative_weights:
        absolute.model = dataclasses.replace(config.model, weights=str(Path(weights).absolute()))
    return absolute


def _train(config: TrainConfig, resume: bool, data: TrainData | None, source: str) -> TrainSummary:
    config = with_absolute_data_paths(config)
    # Checked before anything starts (the process group included); the Trainer resolves it again.
    use_cuda = run_device(config.run.device, world_from_env(), source).type == "cuda"
    with process_group(use_cuda) as world, deterministic_algorithms(config.run.deterministic):
        if config.optim.batch_size % world.world_size:
            raise ConfigError(
                source, "optim.batch_size", config.optim.batch_size,
                f"the global batch must split evenly over {world.world_size} processes",
            )
        return Trainer(config, world, resume, data, source).run()
