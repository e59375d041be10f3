"""``tempme`` entry point. Each subcommand lives in its own module with ``register(subparsers)``;
the registered handler receives the parsed arguments and returns an exit code."""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
import traceback
import warnings

SUBCOMMANDS = ("flops", "bench", "prepare", "train", "eval", "search", "demo")  # search: index and search


def version_line() -> str:
    import torch

    import tempme

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return f"tempme {tempme.__version__} (torch {torch.__version__}, {cuda}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tempme",
        description="Efficient text-video retrieval with TempMe (CLIP + LoRA + video token merging).",
    )
    parser.add_argument("--version", action="version", version=version_line())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"tempme_cli.{name}").register(subparsers)
    parser.set_defaults(command_parsers=subparsers.choices)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that ``KEY=VALUE`` config overrides may also follow options
    (``tempme train --config c.yaml --output run optim.lr=1e-4``), which argparse alone refuses."""
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    command_parser = args.command_parsers.get(args.command, parser)
    if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
        return args
    if hasattr(args, "queries"):
        # Queries after options (`tempme search INDEX -k 5 "a dog"`), which argparse leaves over;
        # after `--`, words that start with a dash too.
        dashes = extra.index("--") if "--" in extra else len(extra)
        words = [item for item in extra[:dashes] if not item.startswith("-")] + extra[dashes + 1 :]
        if len(words) == len(extra) - (dashes < len(extra)):
            args.queries = [*args.queries, *words]
            return args
    command_parser.error(f"unrecognized arguments: {' '.join(extra)}")


def stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end was closed (the poll reports an error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no real stdout
        return False


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as the user's messages they are: Python's default adds the file, line and source
    line of the code that warned (often inside torch's data loader), which say nothing to a user."""
    return f"tempme: warning: {terminal_safe(str(message))}\n"


# The commands that share their work among the processes torchrun starts; the others would each do
# all of it (`tempme index` says why it does not, itself).
TORCHRUN_COMMANDS = ("train", "eval", "prepare", "index")


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def say(line: str) -> None:
    """One line on standard error, in one write: torchrun's workers write unbuffered (``python -u``),
    where ``print`` writes the text and the line end apart and two processes' lines can run together."""
    sys.stderr.write(terminal_safe(line) + "\n")
    sys.stderr.flush()


def terminal_safe(text: str) -> str:
    """``text`` with control characters but line ends and tabs escaped: a message can quote a file's
    contents (an index names weights, a config holds values), and escape sequences in them would
    act on the terminal (clear it, retitle it, hide text)."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def later_torchrun_process() -> bool:
    """Whether this is a process of rank 1 or more that torchrun started. (``world_from_env`` reads the
    same variable, but importing it loads torch.distributed, a quarter second on every command.)"""
    return int(os.environ.get("RANK", "0") or 0) > 0


def shown_by_another_process(error: BaseException) -> bool:
    """Whether, under torchrun, another process prints ``error``, so that this one need not: the
    process that failed and rank 0 print what failed elsewhere, and a bad setting, annotation or
    weights file, which the processes of one machine read alike, is printed by the first of them."""
    if not under_torchrun():
        return False
    from tempme.data.annotations import AnnotationError, MissingVideosError
    from tempme.schedule import ScheduleError
    from tempme.weights import WeightsError
    from tempme_train.config import ConfigError, ProcessConfigError
    from tempme_train.distributed import FailedElsewhere, world_from_env

    if isinstance(error, FailedElsewhere):
        return later_torchrun_process()
    if isinstance(error, ProcessConfigError):  # this process's GPU
        return False
    return world_from_env().local_rank > 0 and isinstance(
        error, (ConfigError, AnnotationError, MissingVideosError, ScheduleError, WeightsError))


def show_only_this_process_warnings() -> None:
    """Under torchrun every process reads the same config, annotations and weights, so rank 0's
    warnings about them are everyone's; the other ranks show only their own (a video of their
    share, their device)."""
    from tempme.userwarnings import SharedWarning

    warnings.filterwarnings("ignore", category=SharedWarning)


def main(argv: list[str] | None = None) -> int:
    try:
        # Both import torch: seconds in which Ctrl-C is likely, and answered in one line.
        from tempme.signals import Terminated, sigterm_raises

        parser = build_parser()
    except KeyboardInterrupt:
        say("tempme: interrupted")
        return 130
    args = parse_arguments(parser, argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2  # a usage error, as argparse's own (1 says a command finished with inputs left out)
    format_warning = warnings.formatwarning
    warnings.formatwarning = one_line_warning  # DataLoader workers fork from here and inherit it
    try:
        with sigterm_raises(), warnings.catch_warnings():
            if under_torchrun() and args.command not in TORCHRUN_COMMANDS:
                raise ValueError(f"{args.command} runs as one process: start it without torchrun")
            if later_torchrun_process():
                show_only_this_process_warnings()
            return args.handler(args) or 0
    except (ValueError, TypeError) as error:
        # Under torchrun one process may be alone to fail (its GPU, its node's files): each prints its own,
        # unless another one prints the same (shown_by_another_process).
        if not shown_by_another_process(error):
            say(f"tempme {args.command}: error: {error}")
        return 2
    except BrokenPipeError as error:
        from tempme.files import describe_os_error

        if not stdout_reader_gone():  # another pipe: an error like any other
            say(f"tempme {args.command}: error: {describe_os_error(error)}")
            return 2
        # The reader of our output went away (`tempme search ... | head`): stop quietly, as Unix tools
        # do. Standard output now leads nowhere, so that flushing it at exit raises nothing either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE: what a shell reports for a tool that SIGPIPE stopped
    except OSError as error:  # a file or folder that cannot be read or written: one line, not a traceback
        from tempme.files import describe_os_error

        if not shown_by_another_process(error):
            say(f"tempme {args.command}: error: {describe_os_error(error)}")
        return 2
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated)
        say(f"tempme {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}")
        # A SIGTERM turned into an interrupt exits as a terminated process does.
        return 143 if terminated else 130
    except Exception as error:  # noqa: BLE001 - not bad input: out of memory, another process's failure, a bug
        # A status of its own: 1 says inputs were left out, 2 that the input was bad.
        if not shown_by_another_process(error):
            if not expected_failure(error):
                traceback.print_exc()  # for a bug report
            say(f"tempme {args.command}: failed: {type(error).__name__}: {error}")
        return 3
    finally:
        warnings.formatwarning = format_warning


def expected_failure(error: Exception) -> bool:
    """A failure whose message says all (out of memory, another torchrun process failed): no traceback."""
    import torch

    from tempme_train.distributed import FailedElsewhere

    return isinstance(error, (torch.OutOfMemoryError, FailedElsewhere))


if __name__ == "__main__":
    sys.exit(main())
