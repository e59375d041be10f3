"""Checkpoints: read CLIP / TempMe weights in the common formats, map them to our layout, save our own.

Formats read (detected by content, not by file name):

- OpenAI's TorchScript archives (the official ``ViT-B-32.pt``) and plain OpenAI state dicts;
- open_clip checkpoints (``{"state_dict": {"module.<key>": ...}}``) and other wrapped torch pickles;
- Hugging Face ``CLIPModel`` weights: a ``model.safetensors`` / ``pytorch_model.bin`` file or a
  directory holding one (sharded checkpoints with an index json too);
- the TempMe authors' checkpoints (``clip.``-prefixed keys, ``TVPt_*`` adapter names);
- our own safetensors files, written by :func:`save_weights`, which carry the model config.

Our layout is OpenAI CLIP's key names plus the adapters ``attn.lora_a`` / ``attn.lora_b`` and
``clip_pos_embed`` (see :mod:`tempme.model`). Every failure raises :class:`WeightsError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import re
import socket
import struct
import urllib.parse
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import CLIPConfig, ModelConfig, TextConfig, VisionConfig, get_preset, preset_names
from .files import atomic_file, check_readable, first_line, write_failed
from .model import TempMe, is_adapter_parameter
from .pickle_scan import BoundedReader, PickleWorkError, check_pickle_work
from .userwarnings import SharedWarning, VideoEncoderWarning, warn

PathLike = str | os.PathLike

#: Hugging Face repositories holding the published weights of the OpenAI presets.
HUB_REPOS: dict[str, str] = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
}

#: Entries that are not weights and are dropped when converting: the integer attributes of OpenAI's
#: TorchScript model, open_clip's causal-mask buffer, and open_clip's SigLIP-style logit bias.
DROPPED_KEYS: frozenset[str] = frozenset(
    {"input_resolution", "context_length", "vocab_size", "attn_mask", "logit_bias"}
)
#: Hugging Face's ``position_ids`` buffers (an ``arange``), present in older HF checkpoints.
DROPPED_SUFFIXES: tuple[str, ...] = (".position_ids",)

#: Adapter names in the TempMe authors' code -> ours.
AUTHOR_RENAMES: tuple[tuple[str, str], ...] = (
    ("attn.TVPt_LoRA_a", "attn.lora_a"),
    ("attn.TVPt_LoRA_b", "attn.lora_b"),
    ("TVPt_Video_Positional_embedding", "clip_pos_embed"),
)

# (ours, Hugging Face) name pairs. A name ending in "." renames every key under that prefix.
_HF_RENAMES: tuple[tuple[str, str], ...] = (
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.", "vision_model.pre_layrnorm."),  # sic: Hugging Face's spelling
    ("visual.ln_post.", "vision_model.post_layernorm."),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.", "text_model.final_layer_norm."),
    ("logit_scale", "logit_scale"),
)
# Projections: ours are [width, embed] matrices applied as x @ P; Hugging Face's are Linear weights [embed, width].
_HF_PROJECTIONS: tuple[tuple[str, str], ...] = (
    ("visual.proj", "visual_projection.weight"),
    ("text_projection", "text_projection.weight"),
)
_HF_BLOCK_PREFIXES: tuple[tuple[str, str], ...] = (
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
)
_HF_BLOCK_RENAMES: tuple[tuple[str, str], ...] = (
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
)
_HF_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")
_OUR_QKV = re.compile(r"attn\.in_proj_(weight|bias)")

# Hugging Face single-file and sharded names, in order of preference.
_HF_FILES: tuple[tuple[str, str], ...] = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


class WeightsError(ValueError):
    """A checkpoint could not be found, read, converted or loaded; the message says which and why."""


# --------------------------------------------------------------------------------------------------
# Reading files


def read_checkpoint(path: PathLike) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file or Hugging Face directory, keys as stored."""
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors and the container kind: ``openai-jit``, ``torch``, ``safetensors`` or ``hf-dir``."""
    if path.is_dir():
        return _read_hf_dir(path), "hf-dir"
    if not path.is_file():
        raise WeightsError(f"{path}: no such file or directory")
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
    except OSError as err:
        raise WeightsError(f"{path}: cannot read ({err.strerror or err})") from None
    if not head:
        raise WeightsError(f"{path}: the file is empty")
    if head.startswith(b"PK\x03\x04"):
        tensors, kind = _read_zip(path)
    # A safetensors file starts with an 8-byte header length followed by the JSON header.
    elif head[8:9] == b"{" or path.suffix == ".safetensors":
        tensors, kind = _read_safetensors(path), "safetensors"
    else:
        _check_legacy_pickles(path)
        tensors, kind = _read_torch(path), "torch"
    _check_backed_by_data(tensors, path)
    return tensors, kind


def _check_backed_by_data(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse tensors that claim more values than their storage holds (a view with a zero stride, or a
    meta tensor): the architecture is read from shapes, and a file of kilobytes would otherwise build a
    model of billions of parameters."""
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu" or tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise WeightsError(f"{path}: {name} claims {list(tensor.shape)} values its file does not hold (a damaged "
                               "or crafted file)")


def _read_zip(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A zip is either a TorchScript archive (has compiled code) or a ``torch.save`` file."""
    try:
        entries = zip_entries(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise WeightsError(f"{path}: corrupt or truncated zip archive ({err})") from None
    except ValueError as err:
        raise WeightsError(f"{path}: {err}") from None
    if any("/code/" in entry.filename or entry.filename.endswith("/constants.pkl") for entry in entries):
        return _read_torchscript(path), "openai-jit"
    return _read_torch(path), "torch"


def zip_entries(path: PathLike) -> list[zipfile.ZipInfo]:
    """The entries of the zip archive at ``path`` (torch's file format), or ValueError where reading
    them could take far more memory than the file: entries that overlap (each is read into memory of
    its own, so a few megabytes of entries over the same bytes unpack to gigabytes), or a pickle or
    tensor entry compressed (torch stores them as they are; only TorchScript's code, not read, is
    compressed), which could unpack to any size; or far more time: a pickle that
    :func:`check_pickle_work` refuses (a :class:`PickleWorkError`).

    They are the entries torch's own reader sees too: names compared whatever their case, as it does,
    and no bytes before the first entry (zipfile then moves every entry by as many bytes, torch's
    reader does not, so the two would read different entries). The ``data.pkl`` torch.load reads is
    checked as torch's reader gives it as well."""
    with zipfile.ZipFile(path) as archive:
        entries = archive.infolist()
        if entries and min(entry.header_offset for entry in entries) != 0:
            raise ValueError("a zip archive whose first entry does not start it, which torch does not write "
                             "(a damaged or crafted file)")
        if sum(entry.compress_size for entry in entries) > Path(path).stat().st_size:
            raise ValueError("a zip archive whose entries overlap (a damaged or crafted file)")
        pickles = [entry for entry in entries if entry.filename.lower().endswith(".pkl")]
        if any(entry.compress_type != zipfile.ZIP_STORED and (entry in pickles or "/data/" in entry.filename.lower())
               for entry in entries):
            raise ValueError("a zip archive with compressed tensors, which torch does not write")
        scanned = set()  # digests of the pickles checked

        def opened(entry: zipfile.ZipInfo) -> tuple[str, io.BytesIO]:
            pickled = archive.read(entry)  # whole, as torch reads it
            scanned.add(hashlib.sha256(pickled).digest())
            return f"its pickle {entry.filename}", io.BytesIO(pickled)

        # data.pkl, which torch.load and tempme read, and TorchScript's constants.pkl.
        check_pickle_work(map(opened, pickles))
    try:
        reader = torch._C.PyTorchFileReader(os.fspath(path))  # what torch.load reads the file with
    except RuntimeError:  # torch.load cannot read the file either
        return entries
    _check_torch_reads_them(path, entries, reader)
    try:
        pickled = reader.get_record("data.pkl") if reader.has_record("data.pkl") else None
    except RuntimeError:
        pickled = None
    if pickled is not None and hashlib.sha256(pickled).digest() not in scanned:
        check_pickle_work([("its pickle data.pkl", io.BytesIO(pickled))])
    return entries


def _check_torch_reads_them(path: PathLike, entries: list[zipfile.ZipInfo], reader: Any) -> None:
    """Refuse a zip archive of which torch's reader finds other entries, or the same at other places,
    than ``entries`` (zipfile's): the two find the directory differently (a zip64 locator pointing
    elsewhere), and every check above would be of an archive torch.load does not read."""
    data_at = {}
    with open(path, "rb") as handle:
        for entry in entries:  # where each entry's data starts: after its local header, name and extra
            handle.seek(entry.header_offset)
            header = handle.read(30)
            if len(header) == 30 and header[:4] == b"PK\x03\x04":
                name_length, extra_length = struct.unpack("<HH", header[26:30])
                data_at[entry.filename.split("/", 1)[-1]] = entry.header_offset + 30 + name_length + extra_length
    try:
        same = all(data_at.get(name) == reader.get_record_offset(name) for name in reader.get_all_records())
    except RuntimeError:
        same = False
    if not same:
        raise ValueError("a zip archive that torch reads otherwise than its directory says (a damaged or crafted file)")


def _check_legacy_pickles(path: Path) -> None:
    """:func:`check_pickle_work` for a torch file of the format before its zip archives
    (``_use_new_zipfile_serialization=False``), as a :class:`WeightsError`: five pickles in a row (a
    magic number, the protocol, the system's sizes, the object, its storages' keys), then the
    storages' bytes; torch.load reads all five. A tar archive, torch's format before that, is refused
    here (torch.load refuses it too with ``weights_only``, advising to load it without)."""
    try:
        with path.open("rb") as handle:
            # The tar header's magic, not tarfile's parsing, which old Pythons do in quadratic time for
            # crafted headers (CVE-2024-6232).
            is_tar = handle.read(262)[257:262] == b"ustar"
    except OSError as err:
        raise WeightsError(f"{path}: cannot read ({err.strerror or err})") from None
    if is_tar:
        raise WeightsError(
            f"{path}: a checkpoint in the tar format of PyTorch before 0.4, which can only be read with "
            "torch.load(weights_only=False), which can run arbitrary code. If you trust the file, load it that way "
            "yourself and save just its state dict with torch.save or safetensors")
    try:
        with path.open("rb") as handle:
            data = BoundedReader(handle, os.fstat(handle.fileno()).st_size)
            check_pickle_work(("its pickled data", data) for _ in range(5))
    except OSError as err:
        raise WeightsError(f"{path}: cannot read ({err.strerror or err})") from None
    except PickleWorkError as err:
        raise WeightsError(_NOT_A_CHECKPOINT.format(path) if err.damaged else f"{path}: {err}") from None


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, read without running its code.

    ``torch.jit.load`` would compile the archive's code and run it (a module's ``__setstate__``), so a
    weights file someone sent, or one an index or config points to, could do anything. The tensors are
    in the archive's ``data.pkl``: module objects whose state holds tensors and submodules, and storages
    kept as files beside it. A restricted unpickler reads them (see ``_ScriptArchiveUnpickler``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(pickles) != 1:
                raise WeightsError(f"{path}: a TorchScript archive without its data.pkl (corrupt?)")
            prefix = pickles[0][: -len("data.pkl")]
            # Archives older than the byteorder record were written little-endian, as newer ones are by default.
            if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder").strip() != b"little":
                raise WeightsError(f"{path}: a TorchScript archive not written little-endian, which tempme does not read")
            root = _ScriptArchiveUnpickler(archive, prefix, path).load()
        if not isinstance(root, _ScriptObject):
            raise WeightsError(f"{path}: a TorchScript archive that holds no module")
        tensors = root.tensors(path)
    except WeightsError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, pickle.UnpicklingError, RuntimeError, ValueError,
            TypeError, AttributeError, IndexError, MemoryError, RecursionError) as err:
        raise WeightsError(f"{path}: corrupt TorchScript archive ({first_line(err)})") from None
    if not tensors:
        raise WeightsError(f"{path}: the TorchScript archive holds no tensors tempme can read (a module that "
                           "saves its state its own way?)")
    return {name: tensor for name, tensor in tensors.items() if name not in DROPPED_KEYS}


class _ScriptObject:
    """A TorchScript module (or other scripted object) as ``data.pkl`` describes it: its state
    (attribute -> value), built without its code."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def tensors(self, path: Path) -> dict[str, torch.Tensor]:
        """Every tensor in the state and, recursively, the submodules' state, by dotted name. A
        submodule reached twice (``self.b = self.a``) is listed under both names, as torch does. Modules
        nested deeper than any model's, or far more module paths than tensors (a crafted web of shared
        submodules, a module inside itself), are refused."""
        found: dict[str, torch.Tensor] = {}
        distinct: set[int] = set()  # tensors, by identity
        pending = [("", self, 0)]  # (prefix, module, depth)
        work = 0  # attributes looked at
        while pending:
            prefix, node, depth = pending.pop()
            state = getattr(node, "state", None)
            work += 1 + (len(state) if isinstance(state, dict) else 0)
            if depth > _MAX_MODULE_DEPTH or max(work, len(found)) > 4 * len(distinct) + 100_000:
                raise WeightsError(f"{path}: a TorchScript archive whose modules nest deeper, or repeat more often, "
                                   "than any model's (a damaged or crafted file)")
            if not isinstance(state, dict):  # an object with its own serialisation: not part of a module tree
                continue
            for name, value in state.items():
                if not isinstance(name, str) or len(name) > 1000:
                    raise WeightsError(f"{path}: a TorchScript module attribute of another name than torch writes")
                if isinstance(value, torch.Tensor):
                    found[f"{prefix}{name}"] = value
                    distinct.add(id(value))
                elif isinstance(value, _ScriptObject):
                    pending.append((f"{prefix}{name}.", value, depth + 1))
        return found


_MAX_MODULE_DEPTH = 64  # CLIP's modules nest 6 deep


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_) -> torch.Tensor:
    # Few dimensions, each below 2^63, before any product of them (of thousands of huge numbers: minutes).
    if not (isinstance(storage, torch.Tensor) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) <= 64
            and all(isinstance(n, int) and 0 <= n < 2**63 for n in (offset, *size, *stride))):
        raise pickle.UnpicklingError("a tensor record of another form than torch writes")
    # No view may claim more values than its storage holds (a zero stride repeats one value any number
    # of times): the shapes are read as the architecture, and lists of a tensor's rows are built.
    if any(step == 0 and n > 1 for n, step in zip(size, stride)) or (
            math.prod(size) and offset + sum((n - 1) * step for n, step in zip(size, stride)) >= storage.numel()):
        raise pickle.UnpicklingError("a tensor larger than its storage")
    return storage.as_strided(size, stride, offset)


def _rebuild_parameter(data: torch.Tensor, *_) -> torch.Tensor:
    return data


def _typed_value(value: Any, *_) -> Any:
    return value


def _plain_list(items: Any = None) -> list:
    """A scripted attribute's typed list, from the list the pickle gives it (never from a tensor's rows)."""
    if items is None:
        return []
    if type(items) is not list:
        raise pickle.UnpicklingError("a typed list of another form than torch writes")
    return items


def _plain_dict() -> dict:
    return {}


class _ScriptArchiveUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's ``data.pkl`` with the few callables it needs, all ours:
    scripted classes become :class:`_ScriptObject` (no code of theirs runs), tensors are views of
    storages read from the archive, and any other global is refused."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): _plain_dict,  # filled by the pickle's own SETITEMS
        # Typed lists and dicts of a scripted module's attributes.
        **{("torch.jit._pickle", name): _plain_list for name in (
            "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "build_genericlist")},
        ("torch.jit._pickle", "restore_type_tag"): _typed_value,
    }

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(archive.open(prefix + "data.pkl"))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, bytearray] = {}  # by key: one storage may be viewed as several dtypes

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in self._ALLOWED:
            allowed = self._ALLOWED[(module, name)]
            # A fresh function each time: the pickle may set attributes on what it gets (BUILD).
            return lambda *args: allowed(*args)
        raise WeightsError(
            f"{self.path}: the TorchScript archive holds a {module}.{name}, which tempme does not read (it reads "
            "modules' tensors without running the archive's code); if you trust the file, convert it once with "
            "torch.save(torch.jit.load(file).state_dict(), new_file), which runs that code"
        )

    def persistent_load(self, record: Any) -> torch.Tensor:
        kind, storage_type, key, _location, count = record
        if kind != "storage" or not isinstance(storage_type, _StorageType) or not isinstance(count, int):
            raise pickle.UnpicklingError(f"unknown persistent record {kind!r}")
        entry = self.archive.getinfo(f"{self.prefix}data/{key}")
        size = count * torch.empty(0, dtype=storage_type.dtype).element_size()
        if entry.file_size != size:  # checked before reading: the record is the file's to claim
            raise pickle.UnpicklingError(f"storage {key} holds {entry.file_size} bytes, not {size}")
        if key not in self.storages:
            self.storages[key] = bytearray(self.archive.read(entry))
        if not size:
            return torch.empty(0, dtype=storage_type.dtype)
        return torch.frombuffer(self.storages[key], dtype=storage_type.dtype)


_NOT_A_CHECKPOINT = "{}: corrupt or not a checkpoint (not a zip, safetensors or torch pickle file)"


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch's "might not support all instructions": the error says it better
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # "not an allowed global", "unsupported GLOBAL ... is blocked"
            raise WeightsError(
                f"{path}: the checkpoint pickles Python objects besides tensors, so it can only be read with "
                "torch.load(weights_only=False), which can run arbitrary code. If you trust the file, load it "
                "that way yourself and save just its state dict with torch.save or safetensors"
            ) from None
        if "Unsupported operand" in str(err):  # FRAME, MEMOIZE ...: the opcodes of pickle protocols 4 and 5
            raise WeightsError(
                f"{path}: saved with pickle protocol 4 or later (torch.save(..., pickle_protocol=4)), whose opcodes "
                "torch's weights-only reader does not take. Save it again with torch.save's default protocol or as "
                "safetensors (if you trust the file: torch.load(weights_only=False), then save its state dict)"
            ) from None
        # torch's own text here suggests weights_only=False, which would not help a damaged file.
        raise WeightsError(_NOT_A_CHECKPOINT.format(path)) from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for damaged files
        raise WeightsError(
            f"{path}: corrupt or not a checkpoint (unreadable as a torch file: {first_line(err)})"
        ) from None
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a torch pickle: bare, or under ``state_dict`` (open_clip) or ``model``."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    # Names are strings in every checkpoint format; other keys (a crafted tuple of tuples can take
    # hours to print) are passed over.
    tensors = {name: value for name, value in obj.items() if isinstance(name, str) and isinstance(value, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: holds no tensors (top-level keys: {_preview(list(obj))})")
    return tensors


# Tensors in one safetensors file: the largest CLIPs hold a few thousand, and making a tensor costs
# microseconds and a few kilobytes (a file of 1.5 million empty ones took 30 s and 3 GB).
SAFETENSORS_TENSORS_LIMIT = 200_000


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            count = len(handle.keys())
        if count > SAFETENSORS_TENSORS_LIMIT:
            raise WeightsError(f"{path}: holds {count:,} tensors, far more than any CLIP checkpoint "
                               f"(at most {SAFETENSORS_TENSORS_LIMIT:,} are read)")
        return load_file(str(path))
    except WeightsError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type and OS errors
        raise WeightsError(f"{path}: corrupt or truncated safetensors file ({err})") from None


def _read_hf_dir(path: Path) -> dict[str, torch.Tensor]:
    for single, index in _HF_FILES:
        if (path / single).is_file():
            return _read(path / single)[0]
        if (path / index).is_file():
            return _read_shards(path / index)
    if (path / "config.yaml").is_file() and any((path / name).exists() for name in ("best.safetensors", "last")):
        raise WeightsError(f"{path} is a run folder of `tempme train`, which loads on its base weights: give it as "
                           "--checkpoint (from Python: tempme_train.modeling.load_trained_model)")
    expected = ", ".join(name for pair in _HF_FILES for name in pair)
    raise WeightsError(f"{path}: directory holds no weights; expected one of {expected}")


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{index}: not a valid shard index ({err})") from None
    tensors: dict[str, torch.Tensor] = {}
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise WeightsError(f"{index}: not a valid shard index (its weight_map is not of tensor names to file names)")
    for shard in sorted(set(weight_map.values())):
        if shard in ("", ".", "..") or Path(shard).name != shard:  # shards lie beside their index, nowhere else
            raise WeightsError(f"{index}: lists shard {shard!r}, which is not a file name in {index.parent}")
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise WeightsError(f"{index}: lists shard {shard}, which is missing from {index.parent}")
        tensors.update(_read(shard_path)[0])
    return tensors


def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (``{}`` when it has none)."""
    try:
        return safetensors_metadata(path)
    except OSError as err:
        raise WeightsError(f"{path}: cannot read ({err.strerror or err})") from None
    except ValueError as err:
        raise WeightsError(f"{path}: cannot read safetensors metadata ({err})") from None


def safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (``{}`` when it has none), for callers that word
    their own errors: OSError where the file cannot be read, ValueError where it is no safetensors file.
    """
    # safetensors reports every file it cannot open as missing; opening it first gives the real reason.
    check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type and OS errors
        raise ValueError(str(err)) from None


# --------------------------------------------------------------------------------------------------
# Key layouts


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """``hf`` (Hugging Face CLIPModel), ``tempme-authors`` or ``openai`` (also open_clip and ours)."""
    names = [_strip_prefix(name, "module.") for name in sd]
    if any(name.startswith(("vision_model.", "text_model.")) for name in names):
        return "hf"
    if any(name.startswith("clip.") for name in names):
        return "tempme-authors"
    return "openai"


def to_tempme_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename any supported layout to ours; non-weight entries (:data:`DROPPED_KEYS`) are dropped.

    Keys this does not recognise are kept as they are, so loading reports them as unexpected.
    """
    layout = detect_layout(sd)
    out = {_strip_prefix(name, "module."): tensor for name, tensor in sd.items()}
    if layout == "hf":
        out = _from_hf(out)
    elif layout == "tempme-authors":
        out = {_from_author_name(name): tensor for name, tensor in out.items()}
    return {name: tensor for name, tensor in out.items() if not _is_dropped(name)}


def _is_dropped(name: str) -> bool:
    return name in DROPPED_KEYS or name.endswith(DROPPED_SUFFIXES)


def _strip_prefix(name: str, prefix: str) -> str:
    return name[len(prefix) :] if name.startswith(prefix) else name


def _from_author_name(name: str) -> str:
    name = _strip_prefix(name, "clip.")
    for theirs, ours in AUTHOR_RENAMES:
        if name.endswith(theirs):
            return name[: -len(theirs)] + ours
    return name


def _rename(name: str, table: tuple[tuple[str, str], ...], to_hf: bool) -> str | None:
    """Apply the first matching (ours, hf) pair of ``table`` in the given direction; None if none match."""
    for ours, hf in table:
        source, target = (ours, hf) if to_hf else (hf, ours)
        if name == source or (source.endswith(".") and name.startswith(source)):
            return target + name[len(source) :]
    return None


def _split_block(name: str, to_hf: bool) -> tuple[str, str] | None:
    """``(target block prefix with index, rest)`` for a transformer-block key, else None."""
    for ours, hf in _HF_BLOCK_PREFIXES:
        source, target = (ours, hf) if to_hf else (hf, ours)
        match = re.match(re.escape(source) + r"(\d+)\.(.+)", name)
        if match:
            return f"{target}{match[1]}.", match[2]
    return None


def _from_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIPModel keys -> ours: renames, fused q/k/v, transposed projections."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # our fused key -> {"q": ..., "k": ..., "v": ...}
    for name, tensor in sd.items():
        projection = _rename(name, _HF_PROJECTIONS, to_hf=False)
        block = _split_block(name, to_hf=False)
        if projection is not None:
            out[projection] = tensor.t().contiguous()
        elif block is not None:
            prefix, rest = block
            fused = _HF_QKV.fullmatch(rest)
            if fused:
                qkv.setdefault(f"{prefix}attn.in_proj_{fused[2]}", {})[fused[1]] = tensor
            else:
                renamed = _rename(rest, _HF_BLOCK_RENAMES, to_hf=False)
                out[name if renamed is None else prefix + renamed] = tensor
        else:
            out[_rename(name, _HF_RENAMES, to_hf=False) or name] = tensor
    for name, parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise WeightsError(f"incomplete attention projection for {name}: found {sorted(parts)}, needs q, k and v")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_hf_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout -> Hugging Face ``CLIPModel`` state dict. Adapters are left out (fold LoRA first to keep it)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        if not is_adapter_parameter(name):
            out.update(_to_hf_entries(name, tensor))
    return out


def _to_hf_entries(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Hugging Face key(s) and tensor(s) for one of our keys: fused QKV splits into three."""
    projection = _rename(name, _HF_PROJECTIONS, to_hf=True)
    if projection is not None:
        return {projection: tensor.t().contiguous()}
    block = _split_block(name, to_hf=True)
    if block is None:
        renamed = _rename(name, _HF_RENAMES, to_hf=True)
    else:
        prefix, rest = block
        fused = _OUR_QKV.fullmatch(rest)
        if fused:
            # Cloned so the three tensors do not share storage (safetensors refuses shared tensors).
            chunks = zip("qkv", tensor.chunk(3))
            return {f"{prefix}self_attn.{part}_proj.{fused[1]}": chunk.clone() for part, chunk in chunks}
        renamed = _rename(rest, _HF_BLOCK_RENAMES, to_hf=True)
        renamed = None if renamed is None else prefix + renamed
    if renamed is None:
        raise WeightsError(f"key {name} has no Hugging Face CLIPModel equivalent")
    return {renamed: tensor}


def hf_config_dict(clip_config: CLIPConfig) -> dict[str, Any]:
    """A ``transformers.CLIPConfig``-compatible dict (the ``config.json`` of a Hugging Face checkpoint)."""
    vision, text = clip_config.vision, clip_config.text
    shared = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": clip_config.embed_dim}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": clip_config.embed_dim,
        "logit_scale_init_value": 2.6592,
        "vision_config": {
            **shared,
            "hidden_size": vision.width,
            "intermediate_size": 4 * vision.width,
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": 3,
        },
        "text_config": {
            **shared,
            "hidden_size": text.width,
            "intermediate_size": 4 * text.width,
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "vocab_size": text.vocab_size,
            # eos_token_id 2 is the published OpenAI configs' legacy value: transformers then pools at
            # argmax(input_ids), the EOT token, exactly as our text encoder does.
            "eos_token_id": 2,
        },
    }


# --------------------------------------------------------------------------------------------------
# Inferring the architecture


def infer_clip_config(
    sd: Mapping[str, torch.Tensor], heads: int | tuple[int, int] | None = None, source: str = "the weights"
) -> CLIPConfig:
    """The CLIP architecture of a state dict (any supported layout), from its tensor shapes.

    Head counts are not visible in the shapes. Without ``heads`` a registered preset with exactly these
    shapes supplies them; failing that, the head count of the published CLIP models of that width
    (``KNOWN_HEADS``); failing that, OpenAI's rule ``width // 64``, with a warning that names ``source``:
    a wrong head count gives wrong embeddings and no error. ``heads`` is one count for both encoders
    or a ``(vision, text)`` pair. Raises WeightsError for a ResNet CLIP, an MLP not 4 times the width,
    or an unknown width that is not a multiple of 64.
    """
    sd = to_tempme_layout(sd)
    required = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
                "token_embedding.weight", "positional_embedding", "text_projection")
    missing = [name for name in required if name not in sd]
    if any(name.startswith(("visual.layer1.", "visual.attnpool.")) for name in sd):
        raise WeightsError("a ResNet CLIP (visual.layer1, visual.attnpool): tempme's video encoder is a ViT; "
                           "use the weights of a ViT CLIP (ViT-B/32, ViT-B/16, ViT-L/14 ...)")
    if missing:
        raise WeightsError(
            f"cannot infer the CLIP architecture: missing {', '.join(missing)} (not a full CLIP checkpoint; "
            "an adapters-only file needs the tempme metadata written by save_weights)"
        )
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    positions = sd["visual.positional_embedding"].shape[0]
    grid = math.isqrt(positions - 1)
    if grid * grid + 1 != positions:
        raise WeightsError(f"visual.positional_embedding has {positions} rows, not grid^2 + 1")
    embed_dim, text_embed_dim = sd["visual.proj"].shape[1], sd["text_projection"].shape[1]
    if text_embed_dim != embed_dim:
        raise WeightsError(f"visual.proj projects to {embed_dim} but text_projection to {text_embed_dim}")
    vocab_size, text_width = sd["token_embedding.weight"].shape
    for prefix, encoder_width in (("visual.transformer.resblocks.0.", width), ("transformer.resblocks.0.", text_width)):
        hidden = sd.get(prefix + "mlp.c_fc.weight")
        if hidden is not None and hidden.shape[0] != 4 * encoder_width:
            raise WeightsError(f"{prefix}mlp is {hidden.shape[0]} wide, not 4 times the width {encoder_width} as in "
                               "CLIP's ViTs, which tempme builds (open_clip's ViT-g/14 and ViT-bigG/14 are not supported)")
    # Heads 0 marks "unknown" while comparing against the presets.
    shapes = CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(width, _count_layers(sd, "visual.transformer.resblocks."), 0, patch, grid * patch),
        text=TextConfig(
            text_width, _count_layers(sd, "transformer.resblocks."), 0, sd["positional_embedding"].shape[0], vocab_size
        ),
    )
    if heads is None:
        preset = _preset_with_shapes(shapes)
        if preset is not None:
            return preset
        heads = _known_heads({"vision": width, "text": text_width}, source)
    vision_heads, text_heads = (heads, heads) if isinstance(heads, int) else heads
    return dataclasses.replace(
        shapes,
        vision=dataclasses.replace(shapes.vision, heads=vision_heads),
        text=dataclasses.replace(shapes.text, heads=text_heads),
    )


def _count_layers(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(match[1]) for match in map(pattern.match, sd) if match}
    if not indices:
        raise WeightsError(f"no transformer blocks under {prefix}")
    absent = sorted(set(range(max(indices) + 1)) - indices)
    if absent:
        raise WeightsError(f"blocks {absent} are missing under {prefix} (found up to {max(indices)})")
    return max(indices) + 1


def _preset_with_shapes(shapes: CLIPConfig) -> CLIPConfig | None:
    for name in preset_names():
        preset = get_preset(name)
        without_heads = dataclasses.replace(
            preset,
            vision=dataclasses.replace(preset.vision, heads=0),
            text=dataclasses.replace(preset.text, heads=0),
        )
        if without_heads == shapes:
            return preset
    return None


#: The head count of each encoder width of the published CLIP ViTs (OpenAI's, and open_clip's
#: ViT-H/14 with its 80-wide vision heads), by encoder.
KNOWN_HEADS: dict[str, dict[int, int]] = {
    "vision": {768: 12, 1024: 16, 1280: 16},
    "text": {512: 8, 768: 12, 1024: 16},
}


def _known_heads(widths: dict[str, int], source: str) -> tuple[int, int]:
    """The (vision, text) head counts for encoders of these ``widths``: the published CLIP models'
    where known, else 64-wide heads, with one warning naming the encoders guessed."""
    where = "register the architecture with tempme.register_preset, or give Hugging Face weights their config.json"
    heads, guessed = {}, []
    for encoder, width in widths.items():
        if width in KNOWN_HEADS[encoder]:
            heads[encoder] = KNOWN_HEADS[encoder][width]
            continue
        if width < 64 or width % 64:
            raise WeightsError(f"cannot infer the head count of the {encoder} encoder's width {width} (not a multiple "
                               f"of 64, OpenAI's head width): {where}")
        heads[encoder] = width // 64
        guessed.append(f"{encoder} width {width}: {width // 64}")
    if guessed:
        warn(f"{source}: the head counts are not recorded, and no published CLIP has these widths: assuming "
             f"64-wide heads ({'; '.join(guessed)}); if it was trained with others, its embeddings will be wrong "
             f"without an error: {where}", SharedWarning)
    return heads["vision"], heads["text"]


def infer_lora_rank(sd: Mapping[str, torch.Tensor]) -> int:
    """LoRA rank of a state dict (any supported layout); 0 without LoRA weights."""
    for name, tensor in to_tempme_layout(sd).items():
        if name.endswith("attn.lora_a"):
            return tensor.shape[0]
    return 0


def infer_frames(sd: Mapping[str, torch.Tensor]) -> int | None:
    """Frame count a TempMe checkpoint was trained with: the clips entering its first ClipMe layer."""
    pattern = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.clip_pos_embed")
    found = {
        int(match[1]): tensor for name, tensor in to_tempme_layout(sd).items() if (match := pattern.fullmatch(name))
    }
    return found[min(found)].shape[1] if found else None


# --------------------------------------------------------------------------------------------------
# Loading into a model


ADAPTERS_ONLY = (
    "this is an adapters-only checkpoint: a tempme train run's loads on its base weights with --checkpoint (from "
    "Python: tempme_train.modeling.load_trained_model(run)); others combine with backbone weights first "
    "({**backbone, **adapters})"
)


def load_state_dict_into(model: TempMe, sd: Mapping[str, torch.Tensor], strict_adapters: bool = False) -> list[str]:
    """Copy a state dict in our layout into ``model`` after checking names and shapes.

    Every backbone weight must be present and every key must belong to the model. Adapters may be
    absent (plain CLIP weights): they keep their initialisation, so LoRA starts as a no-op (B = 0),
    unless ``strict_adapters``. Returns the adapter keys that were not loaded.
    """
    expected = model.state_dict()
    missing = [name for name in expected if name not in sd]
    missing_adapters = [name for name in missing if is_adapter_parameter(name)]
    missing_backbone = [name for name in missing if not is_adapter_parameter(name)]
    unexpected = [name for name in sd if name not in expected]
    if missing_backbone:
        hint = f"; {ADAPTERS_ONLY}" if all(is_adapter_parameter(name) for name in sd) else ""
        raise WeightsError(f"{_listing('missing backbone key', missing_backbone)}{hint}")
    if strict_adapters and missing_adapters:
        raise WeightsError(_listing("missing adapter key", missing_adapters))
    if unexpected:
        raise WeightsError(f"{_listing('unexpected key', unexpected)}{_unexpected_hint(model, unexpected)}")
    for name, tensor in sd.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise WeightsError(
                f"shape mismatch for {name}: checkpoint {list(tensor.shape)}, model {list(expected[name].shape)}; "
                f"{_shape_hint(model, sd, name)}"
            )
    model.load_state_dict(dict(sd), strict=False)
    return missing_adapters


def without_unfitting_clip_pos_embeds(
    model: TempMe, sd: Mapping[str, torch.Tensor], source: str | os.PathLike
) -> dict[str, torch.Tensor]:
    """``sd`` without the clip positional embeddings that ``model`` has no place for, with a warning:
    a checkpoint trained with ``tempme`` loaded for another method, frame count or set of merge
    layers (an ablation, or a zero-shot comparison) keeps its LoRA weights, and the model's clip
    positional embeddings start at zero. Every other key must still fit (``load_state_dict_into``)."""
    expected = model.state_dict()
    dropped = [
        name for name, tensor in sd.items()
        if name.endswith("clip_pos_embed") and (name not in expected or tuple(tensor.shape) != tuple(expected[name].shape))
    ]
    if dropped:
        config = model.config
        layers = ", ".join(map(str, sorted(int(re.search(r"resblocks\.(\d+)\.", name).group(1)) for name in dropped)))
        warn(
            f"{source}: its clip positional embeddings of layer(s) {layers} (trained for {infer_frames(sd)} "
            f"frames) do not fit this model (method {config.merge.method!r}, {config.frames} frames"
            + (f", merge layers {list(config.merge.merge_layers)}" if config.merge.method == "tempme" else "")
            + "): they are left out and the model's own start at zero there; its LoRA weights are loaded",
            VideoEncoderWarning,
        )
    return {name: tensor for name, tensor in sd.items() if name not in dropped}


def _listing(what: str, names: list[str], shown: int = 5) -> str:
    plural = "s" if len(names) != 1 else ""
    return f"{len(names)} {what}{plural}: {_preview(names, shown)}"


def _preview(names: list, shown: int = 5) -> str:
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(map(str, names[:shown])) + more


def _unexpected_hint(model: TempMe, unexpected: list[str]) -> str:
    config = model.config
    if any("lora_" in name for name in unexpected):
        return f"; the checkpoint has LoRA weights but the model was built with lora rank {config.lora.rank}"
    if any("clip_pos_embed" in name for name in unexpected):
        return (
            f"; the checkpoint has clip positional embeddings on layers the model's schedule does not "
            f"(method {config.merge.method!r}, merge layers {config.merge.merge_layers}, {config.frames} frames)"
        )
    return ""


def _shape_hint(model: TempMe, sd: Mapping[str, torch.Tensor], name: str) -> str:
    if name.endswith("clip_pos_embed"):
        return (
            f"the clip positional embeddings were trained for {infer_frames(sd)} frames but the model was built "
            f"for {model.config.frames} (or with another clip schedule); build it with the checkpoint's frame count"
        )
    if "lora_" in name:
        return "the model was built with a different LoRA rank"
    if name == "visual.positional_embedding":
        return "the checkpoint has a different image or patch size"
    if name == "positional_embedding":
        return "the checkpoint has a different text context length"
    if name == "token_embedding.weight":
        return "the checkpoint has a different vocabulary size"
    return "the checkpoint is a different architecture (width, layers or embedding size)"


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hex digest of a model's config and every weight that counts: equal fingerprints mean equal embeddings.

    A LoRA A matrix whose B is all zeros is left out: it is drawn at random whenever a model is
    built, yet changes nothing (B A = 0), so loading the same weights twice gives one fingerprint.
    Reads every parameter once (about a second for ViT-B/32). Take it before
    ``optimize_for_inference``, which rewrites the weights.
    """
    state = model.state_dict()
    unused = {name[: -len("lora_b")] + "lora_a" for name, tensor in state.items()
              if name.endswith("lora_b") and not tensor.any()}
    tensors = ((name, tensor) for name, tensor in state.items() if name not in unused)
    return tensors_digest(tensors, prefix=repr(getattr(model, "config", "")))


def tensors_digest(tensors: Iterable[tuple[str, torch.Tensor]], prefix: str = "") -> str:
    """32 hex digits of SHA-256 over ``prefix`` and each tensor's name and exact bytes, in order."""
    digest = hashlib.sha256(prefix.encode("utf-8"))
    for name, tensor in tensors:
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


# --------------------------------------------------------------------------------------------------
# Our own format


def save_weights(
    model: TempMe, path: PathLike, adapters_only: bool = False, extra_metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights (or only its adapters) to a safetensors file, atomically.

    Metadata: ``format`` = ``tempme`` and ``model_config`` (JSON of the ModelConfig), plus
    ``extra_metadata`` (non-string values JSON-encoded; it cannot override those two).
    A model after ``optimize_for_inference`` is refused: its MLP weights are rescaled for SiLU, and
    loaded back as a checkpoint they would run under QuickGELU and give other embeddings.
    """
    path = Path(path)
    if model.activation_folded:
        raise WeightsError(
            f"{path}: this model was optimised for inference (its MLP weights are rescaled): save the "
            "weights before optimize_for_inference, or use fold_lora alone, which keeps them loadable"
        )
    tensors = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in model.state_dict().items()
        if not adapters_only or is_adapter_parameter(name)
    }
    if not tensors:
        raise WeightsError(f"{path}: the model has no adapters to save (LoRA rank 0 and no clip positional embeddings)")
    extra = extra_metadata or {}
    metadata = {key: value if isinstance(value, str) else json.dumps(value) for key, value in extra.items()}
    metadata.update(format="tempme", model_config=json.dumps(dataclasses.asdict(model.config)))
    # An interrupted save never leaves a half-written checkpoint.
    with atomic_file(path) as temporary:
        try:
            save_file(tensors, str(temporary), metadata=metadata)
        except SafetensorError as error:  # a full disk, say; its message names no file
            raise write_failed(path, error) from None
    return path


def model_config_from_metadata(meta: Mapping[str, str]) -> ModelConfig | None:
    """The ModelConfig stored by :func:`save_weights`; None for files from elsewhere."""
    if meta.get("format") != "tempme" or "model_config" not in meta:
        return None
    try:
        data = json.loads(meta["model_config"])
    except ValueError as err:
        raise WeightsError(f"model_config metadata is not valid JSON ({err})") from None
    return _dataclass_from_dict(ModelConfig, data)


def _dataclass_from_dict(cls: type, data: Any) -> Any:
    """Rebuild nested frozen dataclasses from ``asdict`` output; JSON lists become tuples."""
    if not isinstance(data, dict):
        raise WeightsError(f"model_config metadata: expected an object for {cls.__name__}, got {data!r}")
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - {field.name for field in dataclasses.fields(cls)})
    if unknown:
        raise WeightsError(
            f"model_config metadata: unknown {cls.__name__} fields {unknown} (written by another version?)"
        )
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = _dataclass_from_dict(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return cls(**values)


# --------------------------------------------------------------------------------------------------
# Finding weights


def cache_dir() -> Path:
    """Where named weights are looked for and downloaded: ``$TEMPME_CACHE`` or ``~/.cache/tempme``."""
    return Path(os.environ.get("TEMPME_CACHE") or "~/.cache/tempme").expanduser()


def _offline() -> bool:
    switches = ("TEMPME_OFFLINE", "HF_HUB_OFFLINE")
    return any(os.environ.get(var, "").lower() in ("1", "true", "yes", "on") for var in switches)


def resolve_weights(name_or_path: PathLike) -> Path:
    """A checkpoint path for a file/directory path or a preset name (cached, else downloaded)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name not in preset_names():
        raise WeightsError(
            f"{path} does not exist and {name!r} is not a model preset (presets: {', '.join(preset_names())})"
        )
    stem = cache_dir() / name.replace("/", "-")
    for candidate in (stem.with_name(stem.name + ".pt"), stem.with_name(stem.name + ".safetensors")):
        if candidate.is_file():
            return candidate
    repo = HUB_REPOS.get(name)
    if repo is None:
        raise WeightsError(f"preset {name!r} has no published weights; put a checkpoint at {stem}.pt")
    where = (
        f"put OpenAI's {stem.name}.pt at {stem}.pt, or model.safetensors from the Hugging Face repository "
        f"{repo} at {stem}.safetensors"
    )
    if _offline():
        cached = _hub_cached(repo)
        if cached is None:
            raise WeightsError(
                f"{name} weights are not cached and downloads are off (TEMPME_OFFLINE/HF_HUB_OFFLINE): {where}"
            )
        return cached
    return _download(repo, where)


def _hub_cached(repo: str) -> Path | None:
    """An earlier download of ``repo`` in our cache, if huggingface_hub is installed to find it."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo, "model.safetensors", cache_dir=str(cache_dir()))
    # Besides a path, it returns None or a sentinel object for "known to be absent".
    return Path(found) if isinstance(found, str) else None


def _hub_unreachable() -> str | None:
    """Why the hub surely cannot be reached, found at once, or None. huggingface_hub retries a failed
    connection for half a minute; a host name that does not resolve (no network) is known in a moment.
    Behind a proxy the proxy resolves names, so nothing is checked."""
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(variable) for variable in proxies):
        return None
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        return f"cannot resolve {host}: {err.strerror or err}"
    return None


def _download(repo: str, where: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise WeightsError(f"huggingface_hub is not installed, so {repo} cannot be downloaded; {where}") from None
    unreachable = _hub_unreachable()
    if unreachable:
        raise WeightsError(f"cannot download model.safetensors from {repo} ({unreachable}); {where}")
    try:
        return Path(hf_hub_download(repo_id=repo, filename="model.safetensors", cache_dir=str(cache_dir())))
    except Exception as err:  # noqa: BLE001 - network, HTTP and filesystem errors all end the same way
        raise WeightsError(f"downloading model.safetensors from {repo} failed ({first_line(err)}); {where}") from None


@dataclass
class LoadedWeights:
    """A checkpoint read and converted to our layout, with what could be learned about its model.

    ``source_format``: ``tempme`` (ours), ``tempme-authors``, ``hf``, ``openai-jit`` or ``openai``
    (plain OpenAI and open_clip state dicts).
    """

    state_dict: dict[str, torch.Tensor]
    clip_config: CLIPConfig
    lora_rank: int
    frames: int | None
    model_config: ModelConfig | None
    source_format: str
    path: Path


def load_weights(name_or_path: PathLike) -> LoadedWeights:
    """Find, read and convert a checkpoint (any supported format, or a preset name)."""
    path = resolve_weights(name_or_path)
    raw, container = _read(path)
    try:
        model_config = model_config_from_metadata(read_metadata(path)) if container == "safetensors" else None
        layout = detect_layout(raw)
        sd = to_tempme_layout(raw)
        lora_rank = infer_lora_rank(sd)
        if model_config is not None:
            clip_config = model_config.clip
            _check_recorded_architecture(sd, model_config, lora_rank)
        else:
            clip_config = infer_clip_config(sd, heads=_hf_config_heads(path) if layout == "hf" else None,
                                            source=str(path))
        frames = infer_frames(sd)
        if frames is None and model_config is not None:
            frames = model_config.frames
    except WeightsError as err:
        raise WeightsError(f"{path}: {err}") from None
    if model_config is not None:
        source_format = "tempme"
    else:
        source_format = "openai-jit" if container == "openai-jit" else layout
    return LoadedWeights(sd, clip_config, lora_rank, frames, model_config, source_format, path)


def _check_recorded_architecture(sd: Mapping[str, torch.Tensor], recorded: ModelConfig, lora_rank: int) -> None:
    """Refuse a tempme file whose recorded architecture or LoRA rank is not that of its tensors
    (``lora_rank``: theirs; a damaged or crafted record: the model is built from the record, before any
    tensor is compared with it). Adapters alone do not show the architecture; ``load_model`` refuses
    to build a model from them."""
    clip = recorded.clip
    if lora_rank and lora_rank != recorded.lora.rank:
        raise WeightsError(f"its recorded LoRA rank {recorded.lora.rank} is not that of its adapters ({lora_rank}): "
                           "a damaged file, or not written by tempme")
    if not 0 <= recorded.lora.rank <= min(clip.vision.width, clip.text.width):
        raise WeightsError(f"its recorded LoRA rank {recorded.lora.rank} is beyond its widths: a damaged file")
    if all(is_adapter_parameter(name) for name in sd):
        return
    shapes = infer_clip_config(sd, heads=(clip.vision.heads, clip.text.heads))
    # A frame size the patches do not divide keeps its last pixels out of every patch, as the model does.
    grid_size = clip.vision.image_size // clip.vision.patch_size * clip.vision.patch_size
    if shapes != dataclasses.replace(clip, vision=dataclasses.replace(clip.vision, image_size=grid_size)):
        raise WeightsError(f"its recorded model config ({clip}) is not that of its tensors ({shapes}): a "
                           "damaged file, or not written by tempme")


def _hf_config_heads(path: Path) -> tuple[int, int] | None:
    """Head counts from the ``config.json`` beside Hugging Face weights, which states them; weights of
    another activation than QuickGELU are refused there too."""
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"{config_file}: cannot read it ({err})") from None
    if not isinstance(config, dict) or not all(isinstance(config.get(part), dict) for part in ("vision_config", "text_config")):
        architectures = config.get("architectures") if isinstance(config, dict) else None
        described = f" ({', '.join(map(str, architectures))})" if isinstance(architectures, list) else ""
        raise WeightsError(f"{config_file} describes no CLIPModel{described}: it has no vision_config and text_config, "
                           "and tempme needs both encoders")
    vision, text = config["vision_config"], config["text_config"]
    try:  # transformers' defaults where a config leaves them out
        heads = int(vision.get("num_attention_heads", 12)), int(text.get("num_attention_heads", 8))
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{config_file}: num_attention_heads is not a number ({err})") from None
    # transformers' default; CLIP's own encoders (and tempme's) use QuickGELU, OpenAI's activation.
    activations = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if activations != {"quick_gelu"}:
        raise WeightsError(
            f"{config_file}: hidden_act {sorted(activations)}: tempme's encoders use QuickGELU, as OpenAI's CLIP "
            "weights do, so these weights would give other features than their own model"
        )
    return heads
