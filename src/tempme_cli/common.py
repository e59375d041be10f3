"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path

import torch

from tempme.devices import DeviceUnavailable, resolve_device
from tempme.files import check_folder


class ParagraphHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs filled to the terminal's width paragraph by paragraph, except
    paragraphs with indented lines (examples, lists), which keep their lines as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = text.strip("\n").split("\n\n")
        filled = [
            paragraph if any(line[:1].isspace() for line in paragraph.splitlines())
            else textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent, subsequent_indent=indent)
            for paragraph in paragraphs
        ]
        return "\n\n".join(filled)


class DefaultsHelpFormatter(ParagraphHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it says something: not for flags, unset options (None) or
    help that already names its default; fills descriptions and epilogs as ParagraphHelpFormatter does."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


def user_path(text: str) -> str:
    """A path option as a shell would give it: ``~`` is the home folder (also where the shell left it
    alone, as in ``--cache-dir=~/x`` or a quoted path), never a folder named ``~``."""
    return str(Path(text).expanduser()) if text.startswith("~") else text


def int_list(text: str) -> tuple[int, ...]:
    """'8-9-10', '8,9,10' or '[8, 9, 10]' (as a config writes it) -> (8, 9, 10)."""
    try:
        return tuple(int(part) for part in text.strip().strip("[]").replace(",", "-").split("-") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by '-' or ',', got {text!r}") from None


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """Merge-schedule overrides; unset ones take the paper's defaults for the backbone and frame count."""
    group = parser.add_argument_group(
        "merge schedule (defaults: the paper's, per backbone and frame count; tome reads only --tome-r and "
        "--no-prop-attn, none reads none: options a method does not read are refused)"
    )
    group.add_argument("--tome-r", type=int, help="ImgMe tokens merged per frame per layer (paper: 2 for B/32, 10 for B/16)")
    group.add_argument("--merge-layers", type=int_list, help="0-indexed ClipMe layers, e.g. 8-9-10")
    group.add_argument("--clips-joined", type=int_list, help="clips joined at each ClipMe layer, e.g. 2-2-3 (12 frames)")
    group.add_argument("--cross-merge-ratio", type=float, help="fraction merged across clips (1 - R_C), e.g. 0.3")
    group.add_argument("--intra-merge-ratio", type=float, help="fraction merged within a clip (1 - R_I), e.g. 0.1")
    group.add_argument("--no-clip-pos-embed", action="store_true", help="disable clip positional embeddings")
    group.add_argument("--no-prop-attn", action="store_true", help="disable proportional attention")


def schedule_overrides(args: argparse.Namespace) -> dict:
    overrides = {
        name: getattr(args, name)
        for name in ("tome_r", "merge_layers", "clips_joined", "cross_merge_ratio", "intra_merge_ratio")
        if getattr(args, name, None) is not None
    }
    if getattr(args, "no_clip_pos_embed", False):
        overrides["clip_pos_embed"] = False
    if getattr(args, "no_prop_attn", False):
        overrides["prop_attn"] = False
    return overrides


def check_output_file(path: str | Path, option: str, example_name: str) -> None:
    """Refuse, before any work, an output file ``path`` that is a folder or whose folder cannot be
    made or written to (``tempme.files.check_folder``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; name the file to write (e.g. {path / example_name})")
    check_folder(path.parent, f"{option} {path}: its folder")

def check_finite(value: float, option: str, positive: bool = False) -> None:
    """Refuse nan and infinities (argparse's float() takes them), and with ``positive`` values <= 0."""
    if not math.isfinite(value) or (positive and value <= 0):
        wanted = "a positive number" if positive else "a finite number"
        raise ValueError(f"{option} must be {wanted}, got {value}")


def check_frames_option(frames: int | None) -> None:
    """Refuse ``--frames`` (None: not given) outside what a model can take, naming the option: the
    model's own check, later, says ``frames`` as a Python caller names it."""
    from tempme.schedule import check_frames

    if frames is not None:
        check_frames(frames, name="--frames")


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars (on stderr) for long work: always on a terminal; with ``--json`` not into a log
    file or pipe, where a script reads the output."""
    return not getattr(args, "json", False) or sys.stderr.isatty()


def device_option(name: str) -> torch.device:
    """The device ``--device NAME`` names, or a ValueError naming the option (before any work)."""
    try:
        return resolve_device(name, kinds=("cpu", "cuda", "mps"))  # what run.device takes for training
    except DeviceUnavailable as error:
        raise ValueError(f"--device {name}: {error}") from None


def count(number: int, noun: str) -> str:
    """``"1 video"``, ``"3 videos"``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def exit_status_help(left_out: str | None = None, torchrun: bool = False) -> str:
    """The exit status paragraph of a command's --help. ``left_out``: the inputs it can leave out and
    still finish (None: it has none); ``torchrun``: whether it runs under torchrun (see ``finished``)."""
    lines = ["exit status:", "  0    done"]
    if left_out:
        lines += ["  1    done, but some inputs were left out:",
                  *textwrap.wrap(f"{left_out};", 72, initial_indent=" " * 7, subsequent_indent=" " * 7),
                  "       each is named, and a last line on standard error counts them"]
        if torchrun:
            lines.append("       (0 under torchrun, which takes any other status for a crash)")
    lines += ["  2    error: nothing done, or nothing usable made (bad input);",
              "       one line on standard error says why",
              "  3    failed otherwise: out of memory, another torchrun process failed,",
              "       or a bug (then a traceback comes first, for a bug report);",
              "       a last line on standard error names the error",
              "  130  interrupted (Ctrl-C); 143 terminated (SIGTERM)",
              "  141  the reader of the output went away (tempme ... | head)"]
    return "\n".join(lines)


def finished(command: str, left_out: dict[str, int]) -> int:
    """The exit status of ``command`` that did its work: 0, or 1 where it left out inputs
    (``left_out``: noun -> how many, e.g. ``{"missing video": 2}``), which one line on standard error
    then counts, the last line a script's log shows. Under torchrun 0 all the same: torchrun takes
    any other status for a crashed process and, where --max-restarts allows, starts the work over."""
    from .main import say, under_torchrun

    if not any(left_out.values()):
        return 0
    say(f"tempme {command}: finished, but left out {counts(left_out)}")
    return 0 if under_torchrun() else 1


def counts(numbers: dict[str, int]) -> str:
    """``{"missing video": 2, "undecodable video": 0, "damaged window": 1}`` -> ``"2 missing videos and
    1 damaged window"``: the nouns with a number, in order."""
    counted = [count(number, noun) for noun, number in numbers.items() if number]
    return counted[0] if len(counted) == 1 else f"{', '.join(counted[:-1])} and {counted[-1]}"
