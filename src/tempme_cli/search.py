"""``tempme index`` and ``tempme search``: text search over your own videos.

``index`` embeds every video of some folders once into an index file (incremental and resumable);
``search`` encodes text queries with the same model and ranks the indexed videos.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import torch

from tempme.config import MERGE_METHODS
from tempme.precision import PRECISIONS, default_precision
from tempme.workers import available_cpus

from .common import (
    ParagraphHelpFormatter, check_finite, check_frames_option, check_output_file, count, device_option,
    exit_status_help, finished, show_progress, user_path,
)

INDEX_EPILOG = textwrap.dedent(
    """\
    Run it again on the same folders to add new videos: those already indexed are not decoded again,
    videos whose file changed (size or modification time) are embedded again, and videos deleted under a
    folder given here (whole subfolders too) are dropped; a given folder that is missing or empty now
    (an unmounted drive) keeps its videos, with a warning, unless --prune; a missing one (or a mistyped
    path) makes the run exit 1. Unset --frames, --framerate, --precision, --method, --segment and
    --backend follow the index. Symbolic links to folders are followed (a video reached only through
    links goes when they do); hidden files and folders (names starting with a dot) are left out, and so
    are .ts files that are TypeScript rather than MPEG transport streams. A file whose name starts with
    a dash goes after --, the options before it. An index built by tempme before 2026-11-27 has another
    model fingerprint and is refused: write a new one; so is an index whose weights file was written
    over with other weights since (the error says so). One built by tempme 0.1 (portrait phone videos
    read sideways) is updated with a warning. An interrupted run keeps every finished video (the index
    is written every --save-every seconds and on Ctrl-C); the next run carries on. One run at a time per
    index: a second stops at once. Undecodable videos are listed and tried again next time; a video with
    a damaged stretch is read around it (with a warning) when at least half its frames decode.

    With --segment SECONDS (at least 1) each video is cut into windows of about that length (equal
    windows, no short one left at the end; a video shorter than 1.5 windows stays whole), each
    embedded as a whole video would be: search then finds moments in long videos and prints their
    time spans. A video enters the index once all its windows are embedded; in a damaged video,
    windows in which fewer than half the frames decode are left out, and listed in the summary. The
    index records them: every later run lists them again (without decoding the video again) and
    exits 1, until the file changes (it is then read again) or the video leaves the index.

    examples:
      tempme index ~/videos --weights ViT-B/32 --out videos.index
      tempme index /data/clips /data/more --checkpoint runs/msrvtt_b32_tempme --out clips.index --device cuda
      tempme index ~/recordings --weights ViT-B/32 --segment 30 --out moments.index
      tempme index --weights ViT-B/32 --out videos.index -- -intro.mp4 outro.mp4
      tempme search videos.index "a dog catches a frisbee"

    """
) + exit_status_help("given files or folders that are not there (an existing index is updated without "
                   "them), undecodable videos or damaged windows (--segment; earlier runs' too)")

SEARCH_EPILOG = textwrap.dedent(
    """\
    Queries are encoded by the model that built the index (recorded in it), by its text encoder alone:
    warnings about its video encoder, which `tempme index` gave, are not repeated. If its weights moved,
    name them again with --weights or --checkpoint; they must be the same weights (where other weights
    were written over them since, the error says so: index the videos again into a new index). For an
    index built from a --checkpoint whose base weights moved, --weights names where they are now. In an
    index of segments (tempme index --segment) each result is a window of a video, shown with its time
    span.

    examples:
      tempme search videos.index "a dog catches a frisbee" "people dancing at night" -k 5
      tempme search videos.index "a goal in a football match" --json
      tempme search videos.index            # then type one query per line (Ctrl-D ends)
      tempme search videos.index --json < queries.txt > results.jsonl
      tempme search moments.index "a goal in a football match" --per-video -k 5

    """
) + exit_status_help("lines of standard input that are not UTF-8 text")


def default_workers() -> int:
    """Decoding processes: half the CPUs available (the other half encode), at most 8."""
    return max(0, min(8, available_cpus() // 2))


def add_model_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("model" + (" (--weights, --checkpoint, or both)" if required else ""))
    group.add_argument("--weights", metavar="W",
                       help="CLIP or tempme weights: a file (OpenAI .pt, open_clip, Hugging Face, tempme) or a "
                       "preset name such as ViT-B/32 (downloaded from the Hugging Face hub when online); with "
                       "--checkpoint, the base weights its adapters were trained on, where they are now")
    group.add_argument("--checkpoint", metavar="PATH", type=user_path,
                       help="a run trained with `tempme train`: its folder, a checkpoint folder or weights file")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ..., mps or auto: a CUDA GPU where there is one, else the CPU (default)")


def register(subparsers) -> None:
    index = subparsers.add_parser(
        "index",
        help="embed your videos once into an index file for text search",
        description="Decode and embed every video in the given files and folders (searched recursively) "
        "into one index file that `tempme search` ranks by text.",
        epilog=INDEX_EPILOG,
        formatter_class=ParagraphHelpFormatter,
    )
    index.add_argument("videos", nargs="+", metavar="VIDEO_OR_FOLDER", help="video files and folders of videos")
    index.add_argument("--out", "--output", required=True, metavar="INDEX", dest="out",
                       help="the index file, created or extended")
    add_model_arguments(index, required=True)
    index.add_argument("--method", choices=MERGE_METHODS,
                       help="video encoder's merging, with --weights (default: the index's own, else a tempme "
                       "weights file's own, else tempme; a --checkpoint has its own)")
    index.add_argument("--frames", type=int,
                       help="frames sampled per video, with --weights (default: the index's own, else the "
                       "weights' own, else 12)")
    index.add_argument("--framerate", type=float,
                       help="candidate frames per second to sample from (default: the index's own, else 1)")
    index.add_argument("--segment", type=float, metavar="SECONDS",
                       help="index windows of about this many seconds of each video instead of whole videos, "
                       "so that search finds moments in long videos (default: the index's own, else whole videos)")
    index.add_argument("--batch-size", type=int, default=16,
                       help="videos (or segments) per forward pass (default: 16)")
    index.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                       help="auto: the index's own, else bf16 on a CUDA GPU and fp32 elsewhere (an index keeps "
                       "the precision it was built with)")
    index.add_argument("--prune", action="store_true",
                       help="drop every indexed video whose file is missing, under a missing or empty given "
                       "folder too (for a folder moved or removed for good; without it, such a folder may be "
                       "an unmounted drive and keeps its videos)")
    index.add_argument("--workers", type=int, default=default_workers(),
                       help=f"decoding processes (default: {default_workers()}, half the CPUs available, at most "
                       "8); never more than the CPUs available (more would only compete for them), nor than the "
                       "batches to decode (with --segment, the videos)")
    index.add_argument("--backend", choices=("pyav", "decord"), help="video decoder (default: the index's, else pyav)")
    index.add_argument("--save-every", type=float, default=60.0, metavar="SECONDS",
                       help="write the index at least this often while indexing (default: 60)")
    index.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    index.set_defaults(handler=run_index)

    search = subparsers.add_parser(
        "search",
        help="rank the videos of an index by text",
        description="Encode each query with the model that built the index and print the best-matching "
        "videos with their cosine similarity.",
        epilog=SEARCH_EPILOG,
        formatter_class=ParagraphHelpFormatter,
    )
    search.add_argument("index", metavar="INDEX", type=user_path, help="an index file written by `tempme index`")
    search.add_argument("queries", nargs="*", default=[], metavar="QUERY",
                        help="text to search for (quote each query); none: read queries from standard input, "
                        "one per line of UTF-8 text (blank lines are passed over), answering each as it comes "
                        "(the model loads once); standard input that holds no query is an error (status 2), "
                        "but for a session at a terminal ended (Ctrl-D) before any")
    search.add_argument("-k", "--top", type=int, default=10, help="results per query (default: 10)")
    search.add_argument("--per-video", action="store_true",
                        help="in an index of segments (tempme index --segment), only the best segment of each "
                        "video: -k videos rather than -k segments")
    add_model_arguments(search, required=False)
    search.add_argument("--json", action="store_true", help="print one JSON object per query (JSON lines) instead of a table")
    search.set_defaults(handler=run_search)


def weights_reference(weights: str) -> str:
    """An absolute path for a local file or folder, else the name as given (a preset)."""
    path = Path(weights).expanduser()
    return str(path.resolve()) if path.exists() else weights


def base_weights(weights: str | None, recorded: dict[str, Any]) -> str | None:
    """The base weights for a checkpoint: ``--weights`` if given, else those an index built from a
    checkpoint recorded (named once, when they moved; ``check_base`` refuses them if they do not fit),
    else None (the ones its training config names)."""
    if weights:
        return weights_reference(weights)
    return recorded.get("weights") if recorded.get("checkpoint") else None


def load_search_model(model_info: dict[str, Any]):
    """The model ``model_info`` describes, in eval mode: ``weights`` (with ``method`` and ``frames``), or a
    trained ``checkpoint`` on the base weights its training config names, or on ``weights`` if given
    (the same weights from another place)."""
    import tempme

    if model_info.get("checkpoint"):
        from tempme_train.modeling import load_trained_model

        return load_trained_model(model_info["checkpoint"], model_info.get("weights"))
    return tempme.load_model(model_info["weights"], method=model_info.get("method"), frames=model_info.get("frames")).eval()


# update_index's keyword -> the `tempme index` option that sets it, for error messages.
INDEX_OPTION_NAMES = {
    "batch_size": "--batch-size",
    "framerate": "--framerate",
    "num_workers": "--workers",
    "save_every_s": "--save-every",
    "segment_s": "--segment",
}


def one_line(path: str) -> str:
    """``path`` as it is, or quoted with escapes where it holds a line break or another control
    character, which would break a table of one path per line."""
    return path if path.isprintable() else repr(path)


def saved_count(path: str) -> int:
    """How many videos the index file at ``path`` holds (0 where there is none to read)."""
    from tempme.search import VideoIndexError, read_index_header

    try:
        header = read_index_header(path)
        return len(header["videos"] if "videos" in header else header["paths"])
    except (OSError, VideoIndexError):
        return 0


def find_index_sources(sources: list[str], index: str, header: dict[str, Any] | None, prune: bool) -> list[Path]:
    """The videos of ``sources`` (``find_videos``), as found: links not resolved (``update_index``
    records the links that lead to a video). When updating an existing ``index`` (``header``: its
    header; None for a new index), a missing source (an unmounted drive, or a folder moved for good:
    see --prune) is passed over while another source is there (or --prune has work to do), left out
    of the run (``IndexUpdate.missing_sources``: it exits 1), and
    finding no video is no error: ``update_index`` says what becomes of the videos indexed from such
    sources."""
    from tempme.search import find_videos

    present = [source for source in sources if Path(source).expanduser().exists()]
    if header is None:
        return find_videos(sources, resolve_links=False)  # the error that names the first missing source
    if not (present or prune):
        indexed = [Path(video) for video in header.get("videos", header.get("paths", []))]
        indexed += [Path(link) for links in header["links"].values() for link in links]
        given = [Path(source).expanduser() for source in sources]
        roots = [path.resolve() for path in given] + [path.absolute() for path in given]
        if not any(video == root or video.is_relative_to(root) for video in indexed for root in roots):
            raise FileNotFoundError(f"{', '.join(sources)}: no such file or folder (nothing in {index} came from "
                                    "there: a mistyped path?)")
        raise ValueError(
            f"{', '.join(sources)}: no such file or folder, so nothing to update; {index} keeps the videos "
            "indexed from there (an unmounted drive?): run again when it is back, or add --prune to drop them"
        )
    return find_videos(present, allow_empty=True, resolve_links=False)


def run_index(args: argparse.Namespace) -> int:
    from tempme_train.distributed import world_from_env
    from tempme.data.video import spans_text
    from tempme.search import (
        IndexOptions,
        check_index_free,
        check_index_options,
        check_same_settings,
        read_index_header,
        update_index,
    )
    from tempme.weights import model_fingerprint

    if world_from_env().distributed:
        raise ValueError("tempme index runs as one process (its --workers decode videos in parallel): "
                       "start it without torchrun")
    # argparse's float() takes nan and inf; update_index would take inf (write only at the end), this
    # command has always refused it.
    check_finite(args.save_every, "--save-every")
    check_frames_option(args.frames)
    if args.segment is not None:
        check_finite(args.segment, "--segment", positive=True)  # update_index wants at least a second
    args.out = str(Path(args.out).expanduser())
    check_output_file(args.out, "--out", example_name="videos.index")
    # An existing index decides the settings left unset, so that updating it needs no more options
    # than the first run did. Its header is read once here, for all the checks before the model loads.
    existing = read_index_header(args.out) if Path(args.out).is_file() else None
    recorded = existing["settings"] if existing else {}
    options = IndexOptions.resolve(recorded, framerate=args.framerate, segment_s=args.segment, backend=args.backend,
                                   precision=None if args.precision == "auto" else args.precision)
    framerate, segment_s, backend = options.framerate, options.segment_s, options.backend
    # update_index checks these too, but only once the model has loaded, and by their Python names.
    check_index_options(batch_size=args.batch_size, framerate=framerate, num_workers=args.workers,
                        save_every_s=args.save_every, segment_s=segment_s, backend=backend, names=INDEX_OPTION_NAMES)
    videos = find_index_sources(args.videos, args.out, existing, args.prune)
    found = len({video.resolve() for video in videos})  # a video reached by several links is one
    device = device_option(args.device)
    check_index_free(args.out)  # before the model loads (a download, maybe), not after
    precision = options.precision or default_precision(device)
    built_by = existing["model"] if existing else {}
    if not (args.weights or args.checkpoint):
        raise ValueError("name the model: --weights W (CLIP or tempme weights) or --checkpoint PATH (a trained run)")
    if args.checkpoint:
        from tempme_train.modeling import find_trained_weights

        if args.method or args.frames:
            raise ValueError("--method and --frames go with --weights alone: a trained checkpoint has its own")
        checkpoint = str(find_trained_weights(args.checkpoint).resolve())
        model_info = {"checkpoint": checkpoint, "weights": base_weights(args.weights, built_by)}
    else:
        model_info = {
            "weights": weights_reference(args.weights),
            "method": args.method or built_by.get("method"),
            "frames": args.frames or built_by.get("frames"),
        }
    if existing:  # what can be compared before the model loads (a download, maybe) is compared now
        known = {"framerate": framerate, "precision": precision, "frames": args.frames or recorded.get("frames"),
                 "segment_s": segment_s, "backend": None if backend == "pyav" else backend}
        check_same_settings(args.out, recorded, known, known)
        if args.method and built_by.get("method") not in (None, args.method):
            raise ValueError(f"{args.out} was built by a model with method={built_by['method']!r}, this run asks for "
                             f"method={args.method!r}; embeddings of two models cannot be ranked together: leave "
                             "--method out or write a new index")
    if not args.json:
        source = model_info.get("checkpoint") or model_info["weights"]
        print(f"{count(found, 'video')} found; loading {one_line(source)} on {device} ({precision})", file=sys.stderr)
    model = load_search_model(model_info)
    fingerprint = model_fingerprint(model)
    model.optimize_for_inference()  # same embeddings, less compute
    try:
        update = update_index(
            model, videos, args.out, fingerprint=fingerprint, model_info=model_info, batch_size=args.batch_size,
            device=device, precision=precision, framerate=framerate, num_workers=args.workers,
            backend=backend, save_every_s=args.save_every, progress=show_progress(args),
            sources=args.videos, prune=args.prune, segment_s=segment_s,
        )
    except KeyboardInterrupt:
        print(f"{args.out}: {count(saved_count(args.out), 'video')} indexed, every finished video saved; "
              "run the same command again to carry on", file=sys.stderr)
        raise
    if args.json:
        skipped = [{"path": path, "reason": reason} for path, reason in update.skipped.items()]
        report = {"index": str(args.out), "found": found, "added": update.added, "updated": update.updated,
                  "skipped": skipped, "dropped": update.dropped, "removed": update.removed, "total": update.total,
                  "missing_sources": update.missing_sources}
        if update.segments is not None:
            report["segments"] = update.segments
            report["partial"] = update.partial
            report["partial_earlier"] = update.partial_earlier
        print(json.dumps(report))
        return index_status(args, update, found)
    held = "" if update.segments is None else f" in {count(update.segments, 'segment')}"
    dropped = f" ({len(update.dropped)} of them indexed before, now dropped)" if update.dropped else ""
    print(f"{args.out}: {count(update.total, 'video')} indexed{held} ({update.added} new, {len(update.updated)} changed and "
          f"embedded again, {len(update.skipped)} undecodable{dropped}, {len(update.removed)} deleted and dropped; "
          f"{found} found)")
    for path in update.updated:
        print(f"  changed, embedded again: {one_line(path)}")
    for path, spans in update.partial.items():
        print(f"  damaged, indexed without {spans_text(spans)}: {one_line(path)}")
    for path, spans in update.partial_earlier.items():
        print(f"  damaged, indexed without {spans_text(spans)} (left out by an earlier run): {one_line(path)}")
    for path, reason in update.skipped.items():
        what = "changed, no longer decodes, dropped" if path in update.dropped else "undecodable"
        print(f"  {what}: {one_line(path)}: {reason}")
    for path in update.removed:
        print(f"  deleted: {one_line(path)}")
    for source in update.missing_sources:
        print(f"  not there, passed over: {one_line(source)}")
    return index_status(args, update, found)


def index_status(args: argparse.Namespace, update, found: int) -> int:
    """The exit status of ``tempme index`` (see ``finished``): an index that holds no video, which
    every search would answer with nothing, is an error, though it was written."""
    if update.total == 0:
        why = f"the {count(found, 'video')} found could not be decoded" if found else "no video was found"
        raise ValueError(f"{args.out} holds no videos: {why}")
    windows = sum(len(spans) for partial in (update.partial, update.partial_earlier) for spans in partial.values())
    return finished(args.command, {"missing source": len(update.missing_sources),
                                   "undecodable video": len(update.skipped), "damaged window": windows})


def run_search(args: argparse.Namespace) -> int:
    from tempme.search import VideoIndex, VideoIndexError, rewritten_weights
    from tempme.userwarnings import VideoEncoderWarning
    from tempme.weights import model_fingerprint

    if args.top < 1:
        raise ValueError(f"-k must be at least 1, got {args.top}")
    device = device_option(args.device)  # before the model loads (a download, maybe), not after
    index = VideoIndex.load(args.index)
    if len(index) == 0:  # as `tempme index` refused it: every search would find nothing
        why = f"its {count(len(index.skipped), 'video')} could not be decoded" if index.skipped else "it is empty"
        raise VideoIndexError(f"{args.index} holds no videos ({why}; `tempme index` says why): nothing to search")
    model_info = dict(index.model)
    if args.checkpoint:
        from tempme_train.modeling import find_trained_weights

        checkpoint = str(find_trained_weights(args.checkpoint).resolve())
        model_info.update(checkpoint=checkpoint, weights=base_weights(args.weights, model_info))
    elif args.weights and model_info.get("checkpoint"):
        model_info.update(weights=weights_reference(args.weights))  # the base of the index's checkpoint, moved
    elif args.weights:
        model_info.update(weights=weights_reference(args.weights), checkpoint=None)
    if not (model_info.get("checkpoint") or model_info.get("weights")):
        raise VideoIndexError(
            f"{args.index} does not record which weights built it (it was written from Python without "
            "model_info): name them with --weights or --checkpoint"
        )
    recorded = Path(model_info.get("checkpoint") or model_info["weights"])
    if not args.checkpoint and recorded.is_absolute() and not recorded.exists():
        # Presets are recorded by name (relative): only files and folders can have moved.
        if model_info.get("checkpoint"):
            raise VideoIndexError(
                f"{args.index} was built with the trained weights at {recorded}, which are not there any more: "
                "name where they are now with --checkpoint"
            )
        if not args.weights:
            raise VideoIndexError(
                f"{args.index} was built with the weights at {recorded}, which are not there any more: name "
                "where they are now with --weights"
            )
    with warnings.catch_warnings():
        # Queries go through the text encoder alone; what the video encoder lacks, `tempme index` said.
        warnings.simplefilter("ignore", VideoEncoderWarning)
        model = load_search_model(model_info)
    if model_fingerprint(model) != index.model.get("fingerprint"):
        rewritten = rewritten_weights(index.model, model_info)
        if rewritten:
            raise VideoIndexError(
                f"{args.index} was built by {rewritten} as they were then; they changed since (other weights were "
                "written there), and queries must be encoded by the weights that embedded the videos: name where "
                "those are now with --weights or --checkpoint, or index the videos again into a new index"
            )
        named = model_info.get("checkpoint") or model_info.get("weights")
        recorded = index.model.get("checkpoint") or index.model.get("weights")
        built_by = f" ({recorded} as they were then)" if recorded and recorded != named else ""
        raise VideoIndexError(
            f"{args.index} was built by other weights than {named}{built_by}: queries must be encoded by the "
            "model that embedded the videos (name its weights with --weights or --checkpoint)"
        )
    if args.per_video and index.spans is None:
        warnings.warn(f"--per-video has no effect: {args.index} holds whole videos (it was built without --segment)")
    if args.queries:
        answer(model, index, args.queries, args.top, device, args.json, args.per_video)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        held = "" if index.segments is None else f" ({count(index.segments, 'segment')}{damage_text(index)})"
        print(f"{count(index.videos, 'video')}{held} in {args.index}; type a query and press Enter (Ctrl-D to end)",
              file=sys.stderr)
    lines = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else (text.encode() for text in sys.stdin)
    number = not_text = answered = 0
    for number, raw in enumerate(lines, start=1):
        try:  # UTF-8 whatever the locale says; a byte-order mark (Windows editors write one) is not text
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            warnings.warn(f"line {number} of standard input is not UTF-8 text ({error.reason} at byte "
                          f"{error.start}); passed over")
            not_text += 1
            continue
        if line.strip():
            answer(model, index, [line.strip()], args.top, device, args.json, args.per_video)
            answered += 1
    # Nothing usable: as other commands with none of their inputs. A session at a terminal ended
    # before any query is the user's choice, not bad input.
    if not answered and (not_text or not interactive):
        raise ValueError(f"no query was read: {without_query(number, not_text)}")
    return finished(args.command, {"non-UTF-8 query line": not_text})


def without_query(lines: int, not_text: int) -> str:
    """What standard input held, of ``lines`` lines (``not_text`` of them not UTF-8), when no query was in it."""
    if not lines:
        return "standard input was empty (give queries after INDEX, or one per line of standard input)"
    if not_text:
        return f"standard input held {count(not_text, 'line')} of other text than UTF-8 and none in it"
    return f"standard input held {count(lines, 'blank line')} and no query"


def damage_text(index) -> str:
    """What an index of segments lacks, as `tempme index` reported it: search cannot find those moments."""
    return f"; windows of {count(len(index.partial), 'damaged video')} left out" if index.partial else ""


def warn_if_truncated(model, query: str) -> None:
    """The text encoder reads ``max_words`` tokens, start and end included: say when a query is longer."""
    from tempme.tokenizer import get_tokenizer

    room = model.config.max_words - 2
    tokens = len(get_tokenizer().encode(query))
    if tokens > room:
        shown = textwrap.shorten(query, width=60, placeholder=" ...")
        warnings.warn(f"query {shown!r} has {tokens} tokens; the model reads the first {room} and ignores the rest")


def answer(
    model, index, queries: list[str], top: int, device: torch.device, as_json: bool, per_video: bool = False
) -> None:
    """Print the ``top`` videos (or segments) for each query: a table, or one JSON object per query (JSON lines)."""
    from tempme.search import encode_queries

    for query in queries:
        warn_if_truncated(model, query)
    hits = index.search(encode_queries(model, queries, device), top, per_video=per_video)
    if index.spans is None:
        held = f"{len(index)} videos"
    elif per_video:
        held = f"{index.videos} videos, their best segments"
    else:
        held = f"{len(index)} segments"
    for query, found in zip(queries, hits):
        if as_json:
            results = [hit_record(hit) for hit in found]
            print(json.dumps({"query": query, "results": results}), flush=True)
            continue
        print(f"{query!r}: {len(found)} of {held}")
        for hit in found:
            # Rounded outwards, so that the times shown hold the whole window.
            span = "" if hit.start is None else f"  {clock(hit.start)}-{clock(hit.end, round_up=True)}"
            print(f"  {hit.rank:>3}  {hit.score:6.3f}  {one_line(hit.path)}{span}", flush=True)


def hit_record(hit) -> dict[str, Any]:
    """A search hit as JSON: rank, score, path, and in an index of segments start and end (seconds)."""
    record = {"rank": hit.rank, "score": round(hit.score, 4), "path": hit.path}
    if hit.start is not None:
        record.update(start=hit.start, end=hit.end)
    return record


def clock(seconds: float, round_up: bool = False) -> str:
    """``M:SS``, or ``H:MM:SS`` from an hour on, in whole seconds rounded down (or up)."""
    minutes, secs = divmod(math.ceil(seconds) if round_up else math.floor(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
