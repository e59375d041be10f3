"""Annotation parsers for MSRVTT, DiDeMo, ActivityNet Captions, LSMDC and custom data.

Every loader returns one :class:`VideoItem` per video, holding all of that video's
captions in file order. Paragraph benchmarks (DiDeMo, ActivityNet) hold a single
caption: the video's sentences joined with ``" "``, as the CLIP4Clip loaders do.

Files that do not match their format raise :class:`AnnotationError` naming the file,
the line or field, and the offending value. Videos missing from the video folder do
not stop loading: items still point at the expected path, and
:func:`check_videos_exist` / :func:`require_videos` report or drop them.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..userwarnings import SharedWarning, warn

DATASETS = ("msrvtt", "didemo", "activitynet", "lsmdc", "custom")

MSRVTT_SPLITS = {
    "train": "MSRVTT_train.9k.csv",
    "train9k": "MSRVTT_train.9k.csv",
    "train7k": "MSRVTT_train.7k.csv",
    # No "val": the reference validates on the 1k-A test set, which is model selection on test.
    # Training configs hold out part of the train split instead.
    "test": "MSRVTT_JSFUSION_test.csv",
}
MSRVTT_DATA_JSON = "MSRVTT_data.json"
DIDEMO_SPLITS = ("train", "val", "test")
# CLIP4Clip reads every DiDeMo video over a fixed 0-31 s window (moments are at most 30 s).
DIDEMO_WINDOW = (0.0, 31.0)
ACTIVITYNET_SPLITS = {
    "train": ("train_ids.json", "train.json"),
    "val": ("val_ids.json", "val_1.json"),
    "val_1": ("val_ids.json", "val_1.json"),  # the same split, by the name papers give it
}
# tempme's short split names -> what the dataset's files (and papers) call those splits.
_DATASET_SPLIT_NAMES = {"msrvtt": {"train": "train9k"}, "activitynet": {"val": "val_1"}}
LSMDC_SPLITS = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}
LSMDC_BROKEN_CLIPS = frozenset(
    {
        "0017_Pianist_00.23.28.872-00.23.34.843",
        "0017_Pianist_00.30.36.767-00.30.38.009",
        "3064_SPARKLE_2012_01.41.07.000-01.41.11.793",
    }
)
_MISSING_LISTED = 5
# Markers for AnnotationError's value: none was given (nothing to show), or the field is not in the
# record at all (which "(got None)" would misreport as a JSON null).
_NO_VALUE = object()
_ABSENT = object()


@dataclass
class VideoItem:
    """One video and its captions.

    ``start``/``end`` (seconds) restrict frame sampling; ``None`` means the whole video.
    """

    video_id: str
    path: Path
    captions: list[str] = field(default_factory=list)
    start: float | None = None
    end: float | None = None


class AnnotationError(ValueError):
    """An annotation file that does not match its format."""

    def __init__(
        self,
        path: str | os.PathLike,
        reason: str,
        *,
        line: int | None = None,
        field: str | None = None,
        value: Any = _NO_VALUE,
    ):
        self.path = Path(path)
        self.line = line
        self.field = field
        self.value = None if value is _NO_VALUE or value is _ABSENT else value
        where = [str(self.path)]
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        message = ": ".join(where) + f": {reason}"
        if value is _ABSENT:
            message += " (the field is missing)"
        elif value is not _NO_VALUE:
            message += f" (got {_shorten(value)})"
        super().__init__(message)


class MissingVideosError(FileNotFoundError):
    """Raised by :func:`require_videos` in strict mode."""


def _shorten(value: Any, limit: int = 100) -> str:
    """``repr(value)``, its middle cut out when longer than ``limit``: what is wrong with a row is as
    often at its end (an extra tab or column before the caption) as at its start."""
    text = repr(value)
    if len(text) <= limit:
        return text
    keep = (limit - 5) // 2
    return f"{text[:keep]} ... {text[-keep:]}"


# --- generic readers ------------------------------------------------------------------------


def _require_file(path: Path, what: str) -> Path:
    if path.is_dir():
        raise AnnotationError(path, f"is a folder, not the {what}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _read_text(path: Path) -> str:
    """The whole file as text, line ends as Python's ``open`` gives them. Read in one go so that a file
    that cannot be read or is not UTF-8 (a video or zip named by mistake) is one AnnotationError
    naming it, wherever in the file the bad byte is. A UTF-8 byte order mark at the start (Excel's
    "CSV UTF-8", Windows Notepad) is dropped: it would otherwise stick to the first column's name."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AnnotationError(path, f"cannot read ({err.strerror or err})") from None
    # Stripped by hand rather than decoded as "utf-8-sig", whose error offsets would not count the mark.
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        reason = f"not UTF-8 text (byte 0x{data[err.start]:02x}); annotation files must be UTF-8 text"
        raise AnnotationError(path, reason, line=line) from None


def _read_json(path: Path, text: str | None = None) -> Any:
    """The JSON document in ``path`` (``text``: its contents, when already read)."""
    try:
        return json.loads(_read_text(path) if text is None else text)
    except json.JSONDecodeError as err:
        raise AnnotationError(path, f"invalid JSON ({err.msg})", line=err.lineno) from err


def _expect_texts(entry: dict, keys: tuple[str, ...], path: Path, where: str) -> None:
    """Each of ``keys`` of the object ``entry`` (at ``where`` in ``path``) holds a non-empty string."""
    for key in keys:
        value = _field(entry, key)
        _expect(isinstance(value, str) and bool(value.strip()), path, "expected a non-empty string",
                field=f"{where}.{key}", value=value)


def _field(record: dict[str, Any], key: str) -> Any:
    """``record[key]``, or :data:`_ABSENT` when the record has no such key."""
    return record.get(key, _ABSENT)


def _read_csv(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a CSV with a header; the ``columns`` must exist and be non-empty.

    A row with more fields than the header has columns is refused: it is nearly always a caption with
    an unquoted comma, which would otherwise lose everything after that comma without a word.
    """
    # newline="": the csv module handles line ends itself (quoted fields may hold them).
    with io.StringIO(_read_text(path), newline="") as handle:
        reader = csv.DictReader(handle)
        header = _csv_step(path, reader, lambda: reader.fieldnames)
        if not header:
            raise AnnotationError(
                path, f"empty file, expected a header with columns {list(columns)}", line=1
            )
        missing = [name for name in columns if name not in header]
        if missing:
            raise AnnotationError(path, f"missing column(s) {missing}", line=1, value=",".join(header))
        rows = []
        while (row := _csv_step(path, reader, lambda: next(reader, None))) is not None:
            if None in row:  # DictReader puts the fields beyond the header's columns under None
                extra = row.pop(None)
                count = len(header) + len(extra)
                raise AnnotationError(
                    path,
                    f"{count} fields but the header has {len(header)} columns {header}; a caption that "
                    'holds a comma must be in double quotes, e.g. "a car, a road"',
                    line=reader.line_num,
                    value=",".join([*(row[name] for name in header), *extra]),
                )
            for name in columns:
                if row[name] is None or not row[name].strip():
                    raise AnnotationError(
                        path,
                        "empty or missing value",
                        line=reader.line_num,
                        field=name,
                        value=_ABSENT if row[name] is None else row[name],  # None: the row is short
                    )
            rows.append((reader.line_num, row))
    return rows


def _csv_step(path: Path, reader: csv.DictReader, step: Callable[[], Any]) -> Any:
    """``step()`` (reading the header or a row), a malformed CSV becoming one AnnotationError.

    The line named is where the record began: for a quote that is never closed, which swallows the
    rest of the file into one field until it passes the csv module's field size limit, that is the
    line to look at.
    """
    first_line = reader.line_num + 1
    try:
        return step()
    except csv.Error as err:
        reason = str(err)
        if "field larger than field limit" in reason:
            reason = (
                f"a field longer than {csv.field_size_limit()} characters, more than any caption needs; "
                "is a closing quote missing?"
            )
        raise AnnotationError(path, f"malformed CSV ({reason})", line=first_line) from None


def _read_lines(path: Path) -> list[str]:
    """Non-blank lines, stripped."""
    return [line.strip() for line in io.StringIO(_read_text(path), newline=None) if line.strip()]


def _require_entries(entries: Sequence[Any], path: Path, what: str) -> None:
    """Refuse a split file that lists nothing, naming it (an empty split would fail later, nameless)."""
    _expect(bool(entries), path, f"no {what} in this file; is it the right split file, or was it cut short?")


def _expect(condition: bool, path: Path, reason: str, **where: Any) -> None:
    if not condition:
        raise AnnotationError(path, reason, **where)


class UnknownSplit(AnnotationError):
    """A split name the dataset does not have (the annotations themselves may be fine)."""


def _check_split(split: str, choices: Iterable[str], dataset: str, anno_dir: Path) -> None:
    choices = list(choices)
    if split not in choices:
        raise UnknownSplit(anno_dir, f"unknown {dataset} split {split!r}; choose one of {choices}")


def _index_files(video_dir: Path, key: Callable[[str], str]) -> dict[str, Path]:
    """Map ``key(file name)`` to the file's path for every file under ``video_dir`` (first one wins)."""
    index: dict[str, Path] = {}
    for root, dirs, files in os.walk(video_dir):
        dirs.sort()
        for name in sorted(files):
            index.setdefault(key(name), Path(root) / name)
    return index


def _file_stem(name: str) -> str:
    return Path(name).stem


def _not_found(video_dir: Path, stem: str) -> Path:
    """Where a video looked up by file stem anywhere under ``video_dir`` would be, as a pattern: the
    path a missing one is reported by."""
    return video_dir / "**" / f"{stem}.*"


def _group_captions(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Captions per video id, both in first-appearance order."""
    grouped: dict[str, list[str]] = {}
    for video_id, caption in pairs:
        grouped.setdefault(video_id, []).append(caption)
    return grouped


def _warn_without_captions(listed: Sequence[str], list_path: Path, captions: Container[str], source: Path) -> None:
    """Warn of the videos that ``list_path`` lists but ``source`` gives no captions for."""
    lacking = [video_id for video_id in listed if video_id not in captions]
    if lacking:
        warn(
            f"{len(lacking)} video(s) listed in {list_path} have no captions in {source} and are left out "
            f"(first: {lacking[:_MISSING_LISTED]})",
            SharedWarning,
        )


# --- MSRVTT ------------------------------------------------------------------------------------


def _msrvtt_path(video_dir: Path, video_id: str) -> Path:
    """``{id}.mp4``, or ``{id}.webm`` when only that exists (CLIP4Clip's fallback)."""
    mp4 = video_dir / f"{video_id}.mp4"
    webm = video_dir / f"{video_id}.webm"
    return webm if not mp4.exists() and webm.exists() else mp4


def _msrvtt_sentences(path: Path) -> list[tuple[str, str]]:
    """``(video_id, caption)`` for every entry of ``MSRVTT_data.json['sentences']``."""
    data = _read_json(path)
    _expect(
        isinstance(data, dict) and "sentences" in data, path, "expected an object with a 'sentences' list"
    )
    sentences = data["sentences"]
    _expect(
        isinstance(sentences, list),
        path,
        "expected a list",
        field="sentences",
        value=type(sentences).__name__,
    )
    pairs = []
    for i, entry in enumerate(sentences):
        _expect(isinstance(entry, dict), path, "expected an object", field=f"sentences[{i}]", value=entry)
        _expect_texts(entry, ("video_id", "caption"), path, f"sentences[{i}]")
        pairs.append((entry["video_id"], entry["caption"]))
    return pairs


def load_msrvtt(anno_dir: str | os.PathLike, video_dir: str | os.PathLike, split: str) -> list[VideoItem]:
    """MSRVTT from CLIP4Clip's ``msrvtt_data.zip`` files.

    Splits: ``train``/``train9k`` (9k CSV, all 20 captions per video from ``MSRVTT_data.json``),
    ``train7k``, and ``test`` (JSFUSION 1k-A, one caption per video). There is no validation split.
    """
    anno_dir, video_dir = Path(anno_dir), Path(video_dir)
    _check_split(split, MSRVTT_SPLITS, "MSRVTT", anno_dir)
    csv_path = _require_file(anno_dir / MSRVTT_SPLITS[split], f"MSRVTT {split} split file")
    if split == "test":
        rows = _read_csv(csv_path, ("video_id", "sentence"))
        _require_entries(rows, csv_path, "rows after the header")
        captions = _group_captions((row["video_id"].strip(), row["sentence"]) for _, row in rows)
        video_ids = list(captions)
    else:
        video_ids = [row["video_id"].strip() for _, row in _read_csv(csv_path, ("video_id",))]
        _require_entries(video_ids, csv_path, "video ids after the header")
        json_path = _require_file(anno_dir / MSRVTT_DATA_JSON, "MSRVTT sentences file")
        wanted = set(video_ids)
        captions = _group_captions(pair for pair in _msrvtt_sentences(json_path) if pair[0] in wanted)
        _warn_without_captions(video_ids, csv_path, captions, json_path)
    return [
        VideoItem(video_id, _msrvtt_path(video_dir, video_id), captions[video_id])
        for video_id in dict.fromkeys(video_ids)
        if video_id in captions
    ]


# --- DiDeMo ------------------------------------------------------------------------------------


def _didemo_descriptions(path: Path) -> list[tuple[str, str]]:
    data = _read_json(path)
    _expect(
        isinstance(data, list),
        path,
        "expected a JSON list of moment annotations",
        value=type(data).__name__,
    )
    pairs = []
    for i, entry in enumerate(data):
        _expect(isinstance(entry, dict), path, "expected an object", field=f"[{i}]", value=entry)
        _expect_texts(entry, ("video", "description"), path, f"[{i}]")
        pairs.append((entry["video"], entry["description"]))
    return pairs


def _didemo_path(files: dict[str, Path], video_dir: Path, video: str) -> Path:
    """The file named exactly ``video`` or, as X-CLIP stores transcoded copies, ``<video>.mp4``."""
    return files.get(video) or files.get(f"{video}.mp4") or video_dir / video


def load_didemo(anno_dir: str | os.PathLike, video_dir: str | os.PathLike, split: str) -> list[VideoItem]:
    """DiDeMo from LocalizingMoments' ``{split}_list.txt`` and ``{split}_data.json``.

    One item per listed video with descriptions; its caption is the descriptions joined with
    ``" "`` in file order. Frames are sampled over 0-31 s like CLIP4Clip (the whole clip for
    DiDeMo's <= 30 s videos). The file name must equal the ``video`` value (``.m4v``, ``.mov``, ...);
    X-CLIP-style ``<video>.mp4`` copies are accepted too.
    """
    anno_dir, video_dir = Path(anno_dir), Path(video_dir)
    _check_split(split, DIDEMO_SPLITS, "DiDeMo", anno_dir)
    list_path = _require_file(anno_dir / f"{split}_list.txt", f"DiDeMo {split} list")
    listed = _read_lines(list_path)
    _require_entries(listed, list_path, "video names (one per line)")
    json_path = _require_file(anno_dir / f"{split}_data.json", f"DiDeMo {split} annotations")
    wanted = set(listed)
    descriptions = _group_captions(pair for pair in _didemo_descriptions(json_path) if pair[0] in wanted)
    _warn_without_captions(listed, list_path, descriptions, json_path)
    files = _index_files(video_dir, lambda name: name)
    start, end = DIDEMO_WINDOW
    return [
        VideoItem(video, _didemo_path(files, video_dir, video), [" ".join(descriptions[video])], start, end)
        for video in dict.fromkeys(listed)
        if video in descriptions
    ]


# --- ActivityNet Captions ---------------------------------------------------------------------


def _activitynet_ids(path: Path) -> list[str]:
    ids = _read_json(path)
    _expect(isinstance(ids, list), path, "expected a JSON list of video ids", value=type(ids).__name__)
    for i, video_id in enumerate(ids):
        _expect(isinstance(video_id, str), path, "expected a string", field=f"[{i}]", value=video_id)
    _require_entries(ids, path, "video ids")
    return ids


def _activitynet_entry(path: Path, key: str, entry: Any) -> tuple[str, float | None]:
    """Paragraph and duration of one ``train.json``/``val_1.json`` entry."""
    _expect(isinstance(entry, dict), path, "expected an object", field=key, value=entry)
    sentences = _field(entry, "sentences")
    _expect(
        isinstance(sentences, list) and bool(sentences) and all(isinstance(s, str) for s in sentences),
        path,
        "expected a non-empty list of strings",
        field=f"{key}.sentences",
        value=sentences,
    )
    duration = entry.get("duration")
    _expect(
        duration is None or (isinstance(duration, (int, float)) and not isinstance(duration, bool)),
        path,
        "expected a number",
        field=f"{key}.duration",
        value=duration,
    )
    # JSON as Python reads it allows NaN and Infinity; neither, nor a length of 0 s or less, can
    # bound frame sampling (0 to ceil(duration)).
    _expect(
        duration is None or (math.isfinite(duration) and duration > 0),
        path,
        "expected a positive, finite number of seconds",
        field=f"{key}.duration",
        value=duration,
    )
    # Later sentences usually start with a space; joining keeps the reference's double spaces.
    paragraph = " ".join(sentences)
    _expect(bool(paragraph.strip()), path, "the sentences are all empty", field=f"{key}.sentences", value=sentences)
    return paragraph, duration


def load_activitynet(
    anno_dir: str | os.PathLike, video_dir: str | os.PathLike, split: str
) -> list[VideoItem]:
    """ActivityNet Captions; ``val`` is ``val_1`` (either name).

    The caption is ``" ".join(sentences)``; sampling spans 0 to ``ceil(duration)`` s as in CLIP4Clip.
    Video ids drop the ``v_`` prefix and are matched to file stems anywhere under ``video_dir``.
    """
    anno_dir, video_dir = Path(anno_dir), Path(video_dir)
    _check_split(split, ACTIVITYNET_SPLITS, "ActivityNet", anno_dir)
    ids_name, data_name = ACTIVITYNET_SPLITS[split]
    ids_path = _require_file(anno_dir / ids_name, f"ActivityNet {split} ids")
    keys = _activitynet_ids(ids_path)
    data_path = _require_file(anno_dir / data_name, f"ActivityNet {split} annotations")
    data = _read_json(data_path)
    _expect(
        isinstance(data, dict), data_path, "expected an object keyed by video id", value=type(data).__name__
    )
    _warn_without_captions(keys, ids_path, data, data_path)
    files = _index_files(video_dir, _file_stem)
    items = []
    for key in dict.fromkeys(keys):
        if key not in data:
            continue
        paragraph, duration = _activitynet_entry(data_path, key, data[key])
        video_id = key[2:] if key.startswith("v_") else key
        end = None if duration is None else float(math.ceil(duration))
        items.append(VideoItem(video_id, files.get(video_id) or _not_found(video_dir, video_id), [paragraph], 0.0, end))
    return items


# --- LSMDC -----------------------------------------------------------------------------------


def _lsmdc_rows(path: Path) -> list[tuple[str, str]]:
    """``(clip_id, sentence)`` from a headerless 6-field TSV."""
    pairs = []
    with io.StringIO(_read_text(path), newline=None) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            # Only the line end is cut before splitting: stripping all whitespace would also take the
            # tab before a blank sentence, and report a missing field instead of the empty sentence.
            row = line.rstrip("\r\n")
            fields = row.split("\t")
            while len(fields) > 6 and not fields[-1].strip():
                fields.pop()  # trailing tabs, as some spreadsheet exports add
            if len(fields) != 6:
                reason = f"expected 6 tab-separated fields, found {len(fields)}"
                raise AnnotationError(path, reason, line=number, value=row)
            _expect(bool(fields[5].strip()), path, "empty sentence", line=number, field="SENTENCE", value=row)
            pairs.append((fields[0].strip(), fields[5].rstrip()))  # as before: trailing whitespace cut
    _require_entries(pairs, path, "annotation rows")
    return pairs


def load_lsmdc(anno_dir: str | os.PathLike, video_dir: str | os.PathLike, split: str) -> list[VideoItem]:
    """LSMDC 2016 (``train``/``val``/``test``); each TSV row is one caption.

    Clips are matched to file stems anywhere under ``video_dir``; the three known broken clips are skipped.
    """
    anno_dir, video_dir = Path(anno_dir), Path(video_dir)
    _check_split(split, LSMDC_SPLITS, "LSMDC", anno_dir)
    path = _require_file(anno_dir / LSMDC_SPLITS[split], f"LSMDC {split} annotations")
    captions = _group_captions(pair for pair in _lsmdc_rows(path) if pair[0] not in LSMDC_BROKEN_CLIPS)
    files = _index_files(video_dir, _file_stem)
    return [VideoItem(clip, files.get(clip) or _not_found(video_dir, clip), texts) for clip, texts in captions.items()]


# --- custom ------------------------------------------------------------------------------------


def _custom_csv(path: Path) -> list[tuple[str, str]]:
    return [(row["video"].strip(), row["caption"]) for _, row in _read_csv(path, ("video", "caption"))]


def _custom_records(path: Path) -> list[tuple[dict[str, Any], Any]]:
    """JSON records (a JSON list, or JSON lines), each with where it came from (line or list index)."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        return [({"field": f"[{i}]."}, record) for i, record in enumerate(_read_json(path, text))]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(({"line": number}, json.loads(line)))
        except json.JSONDecodeError as err:
            raise AnnotationError(path, f"invalid JSON ({err.msg})", line=number, value=line) from err
    return records


def _custom_record_captions(path: Path, where: dict[str, Any], record: Any) -> tuple[str, list[str]]:
    """Video path and captions of one ``{"video", "caption"|"captions"}`` record."""
    prefix = where.get("field", "")
    line = where.get("line")
    if not isinstance(record, dict):
        raise AnnotationError(
            path, "expected an object", line=line, field=prefix.rstrip(".") or None, value=record
        )
    video = _field(record, "video")
    if not (isinstance(video, str) and video.strip()):
        raise AnnotationError(
            path, "expected a video path string", line=line, field=f"{prefix}video", value=video
        )
    if "captions" in record:
        texts = record["captions"]
        valid = (
            isinstance(texts, list) and bool(texts) and all(isinstance(t, str) and t.strip() for t in texts)
        )
        key, reason = "captions", "expected a non-empty list of non-empty strings"
    else:
        texts = [_field(record, "caption")]
        valid = isinstance(texts[0], str) and bool(texts[0].strip())
        key, reason = "caption", "expected a non-empty string (or a 'captions' list)"
    if not valid:
        raise AnnotationError(path, reason, line=line, field=f"{prefix}{key}", value=_field(record, key))
    return video.strip(), texts


def _custom_json(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for where, record in _custom_records(path):
        video, texts = _custom_record_captions(path, where, record)
        pairs.extend((video, text) for text in texts)
    return pairs


def load_custom(path: str | os.PathLike, video_root: str | os.PathLike | None = None) -> list[VideoItem]:
    """Your own videos and captions.

    Formats (chosen by extension): ``.csv`` with a header containing ``video`` and ``caption``
    (one row per caption; repeated videos are grouped), or ``.jsonl``/``.json`` holding JSON
    lines or a JSON list of ``{"video": ..., "caption": ...}`` / ``{"video": ..., "captions": [...]}``.
    Relative video paths are resolved against ``video_root`` (default: the annotation file's
    folder). Rows that name the same file in different ways (``clips/a.mp4``, ``./clips/a.mp4``,
    an absolute path, a symbolic link) are one video, whose id is the path exactly as first written.
    """
    path = _require_file(Path(path), "custom annotation file (a .csv or .jsonl file)")
    root = Path(video_root) if video_root is not None else path.parent
    if path.suffix.lower() == ".csv":
        pairs = _custom_csv(path)
    elif path.suffix.lower() in (".json", ".jsonl"):
        pairs = _custom_json(path)
    else:
        raise AnnotationError(path, "unsupported extension; use .csv, .json or .jsonl", value=path.suffix)
    _expect(bool(pairs), path, "no annotations found")
    # Grouped by the file each path names, not by its spelling: otherwise one file would be several
    # videos, each a wrong answer to the others' captions in evaluation.
    files = {video: (root / video).resolve() for video in dict.fromkeys(video for video, _ in pairs)}
    first_spelling: dict[Path, str] = {}
    for video, file in files.items():
        first_spelling.setdefault(file, video)
    grouped = _group_captions((first_spelling[files[video]], text) for video, text in pairs)
    return [VideoItem(video, root / video, texts) for video, texts in grouped.items()]


# --- dispatch and video checks -------------------------------------------------------------


def dataset_split_name(dataset: str, split: str) -> str:
    """The dataset's own name for ``split`` (ActivityNet's ``val`` is its ``val_1``), so that what is
    reported can be looked up in its annotations."""
    return _DATASET_SPLIT_NAMES.get(dataset.lower(), {}).get(split, split)


def load_dataset(
    name: str,
    anno_path: str | os.PathLike,
    video_dir: str | os.PathLike | None,
    split: str = "train",
) -> list[VideoItem]:
    """Load a benchmark by name (``msrvtt``, ``didemo``, ``activitynet``, ``lsmdc`` or ``custom``).

    ``anno_path`` is the annotation folder, or the annotation file for ``custom`` (whose
    ``video_dir`` is the optional video root and which ignores ``split``).
    """
    name = name.lower()
    if name == "custom":
        return load_custom(anno_path, video_dir)
    loaders = {
        "msrvtt": load_msrvtt,
        "didemo": load_didemo,
        "activitynet": load_activitynet,
        "lsmdc": load_lsmdc,
    }
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if video_dir is None:
        raise ValueError(f"dataset {name!r} needs a video_dir")
    return loaders[name](anno_path, video_dir, split)


def check_videos_exist(items: Iterable[VideoItem]) -> list[VideoItem]:
    """The items whose video file does not exist."""
    return [item for item in items if not item.path.is_file()]


def require_videos(items: Sequence[VideoItem], strict: bool = False) -> list[VideoItem]:
    """Keep the items whose video exists.

    Args:
        items: loaded annotations.
        strict: raise :class:`MissingVideosError` when any video is missing, instead of
            warning and dropping those items.

    Returns:
        The items with an existing video file, in order.
    """
    missing = check_videos_exist(items)
    if not missing:
        return list(items)
    shown = ", ".join(str(item.path) for item in missing[:_MISSING_LISTED])
    more = f" and {len(missing) - _MISSING_LISTED} more" if len(missing) > _MISSING_LISTED else ""
    message = f"{len(missing)} of {len(items)} videos are missing: {shown}{more}"
    if strict:
        raise MissingVideosError(message)
    warn(message + "; skipping them", SharedWarning)
    absent = {id(item) for item in missing}
    return [item for item in items if id(item) not in absent]
