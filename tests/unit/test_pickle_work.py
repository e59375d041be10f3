"""Pickles that would take hours to unpickle are refused before any unpickler reads them
(tempme.pickle_scan.check_pickle_work): in weights files of torch's two formats, in TorchScript archives and
in a training run's state.pt. Checkpoints of every kind tempme reads still load (test_weights.py,
test_train_loop.py).

The crafted file: a dict whose key is key_40, where key_0 = () and key_i = (key_i-1, key_i-1), the
second one through the memo. A few hundred bytes unpickle to a tree of 2^40 leaves sharing its
branches, which hashing walks in full: 0.4 s at 26 levels, doubling with each (hours at 40).
"""

import codecs
import io
import pickle
import struct
import sys
import warnings
import zipfile

import pytest
import torch

from tempme import weights
from tempme.pickle_scan import PICKLE_DEPTH_LIMIT, PICKLE_PARTS_LIMIT, PickleWorkError, check_pickle_work
from tempme.weights import WeightsError, read_checkpoint

LEVELS = 40


def shared_key(levels: int) -> bytes:
    """Protocol 2 opcodes that push key_levels (2^(levels+1) - 1 objects as a tree): 10 bytes a level."""
    ops = bytearray(b")r" + struct.pack("<I", 0))  # EMPTY_TUPLE, LONG_BINPUT 0
    for level in range(1, levels + 1):  # LONG_BINGET the one below, TUPLE2 with the one below, LONG_BINPUT
        ops += b"j" + struct.pack("<I", level - 1) + b"\x86r" + struct.pack("<I", level)
    return bytes(ops)


def keyed_dict(levels: int) -> bytes:
    """``{key_levels: 0}``, pickled as torch.save pickles (protocol 2)."""
    return b"\x80\x02}" + shared_key(levels) + b"K\x00s."


def legacy_file(pickled: bytes) -> bytes:
    """A torch file of the format before zip archives holding the object ``pickled`` (and no tensors):
    as torch.save(..., _use_new_zipfile_serialization=False) writes it, five pickles in a row."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    system = {"protocol_version": PROTOCOL_VERSION, "little_endian": sys.byteorder == "little",
              "type_sizes": {"short": 2, "int": 4, "long": 4}}
    head = b"".join(pickle.dumps(part, protocol=2) for part in (MAGIC_NUMBER, PROTOCOL_VERSION, system))
    return head + pickled + pickle.dumps([], protocol=2)  # the last: the keys of its storages


def zip_file(pickled: bytes, root: str = "archive") -> bytes:
    """A torch file of the zip format whose ``data.pkl`` is ``pickled``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{root}/data.pkl", pickled)
        archive.writestr(f"{root}/version", "3\n")
    return buffer.getvalue()


@pytest.mark.parametrize("wrap", [legacy_file, zip_file])
def test_the_crafted_files_are_read_by_torch_as_trees_twice_as_large_each_level(tmp_path, wrap):
    path = tmp_path / "small.pt"
    path.write_bytes(wrap(keyed_dict(12)))
    (key,) = torch.load(path, weights_only=True)  # 12 levels: unpickled in no time

    def leaves(node: tuple) -> int:
        return sum(map(leaves, node)) if node else 1

    assert leaves(key) == 2**12
    assert len(wrap(keyed_dict(LEVELS))) < 1000  # the one refused below


@pytest.fixture
def no_unpickling(monkeypatch):
    """Reaching an unpickler fails the test at once (the crafted files would take hours there)."""

    def unpickled(*args, **kwargs):
        pytest.fail("the file reached an unpickler")

    monkeypatch.setattr(torch, "load", unpickled)
    monkeypatch.setattr(weights._ScriptArchiveUnpickler, "load", unpickled)


@pytest.mark.parametrize("wrap, where", [(legacy_file, "its pickled data"), (zip_file, "its pickle archive/data.pkl")])
def test_a_crafted_weights_file_is_refused_before_it_is_unpickled(tmp_path, no_unpickling, wrap, where):
    path = tmp_path / "shared.pt"
    path.write_bytes(wrap(keyed_dict(LEVELS)))
    with pytest.raises(WeightsError) as info:
        read_checkpoint(path)
    assert str(info.value) == (
        f"{path}: {where} builds or hashes more than 10,000,000 parts, counting a part it shares each time it is "
        "reached: far more than any checkpoint, which could take hours to unpickle (a damaged or crafted file)")
    assert "weights_only" not in str(info.value)


def test_a_crafted_torchscript_archive_is_refused_before_it_is_unpickled(tmp_path, no_unpickling):
    archive = tmp_path / "scripted.pt"
    with zipfile.ZipFile(archive, "w") as zipped:  # a scripted module __torch__.M whose state is {key: 0}
        zipped.writestr("a/data.pkl", b"\x80\x02c__torch__\nM\n)\x81}" + shared_key(LEVELS) + b"K\x00sb.")
        zipped.writestr("a/constants.pkl", b"\x80\x02).")
    with pytest.raises(WeightsError, match="scripted.pt: its pickle a/data.pkl builds or hashes more than 10,000,000"):
        read_checkpoint(archive)


def test_a_crafted_state_file_is_refused_before_it_is_unpickled(tmp_path, no_unpickling, monkeypatch):
    from tempme_train import checkpoint

    monkeypatch.setattr(checkpoint, "load_trained_weights", lambda model, path: None)  # read before, not the point
    state = tmp_path / "last" / checkpoint.STATE
    state.parent.mkdir()
    state.write_bytes(zip_file(keyed_dict(LEVELS), root="state"))
    with pytest.raises(ValueError) as info:
        checkpoint.load_checkpoint(state.parent, None, None, None, None)
    assert str(info.value).startswith(
        f"cannot resume: {state}: its pickle state/data.pkl builds or hashes more than 10,000,000 parts, counting a "
        "part it shares each time it is reached: far more than any checkpoint, which could take hours to unpickle (a "
        f"damaged or crafted file); resume from an earlier copy of {state.parent}")


def test_an_archive_torch_would_read_otherwise_than_zipfile_is_refused(tmp_path, no_unpickling):
    # Two archives in a row, the end record the second's pointing at the first's directory: zipfile finds the
    # second's (it moves the offsets by the bytes before them), torch's reader the first's.
    def pieces(pickled: bytes, pad: bytes) -> tuple[bytes, bytes, int]:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("archive/data.pkl", pickled)
            archive.writestr("archive/version", "3\n" + pad.decode())
        data = buffer.getvalue()
        count, size, offset = struct.unpack("<HII", data[-12:-2])
        return data[:offset], data[offset:offset + size], count

    crafted, crafted_directory, count = pieces(keyed_dict(LEVELS), b" " * 300)
    plain, plain_directory, _ = pieces(pickle.dumps({"w": 0}, protocol=2), b"")
    moved = bytearray(plain_directory)
    for start in (0, moved.index(b"PK\x01\x02", 4)):  # its two entries' offsets, as zipfile will move them
        (offset,) = struct.unpack("<I", moved[start + 42:start + 46])
        moved[start + 42:start + 46] = struct.pack("<I", offset + len(crafted) - len(plain))
    assert len(crafted_directory) == len(plain_directory)
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, count, count, len(crafted_directory), len(crafted), 0)
    path = tmp_path / "two.pt"
    path.write_bytes(crafted + crafted_directory + plain + bytes(moved) + end)
    with zipfile.ZipFile(path) as archive:
        assert pickle.loads(archive.read("archive/data.pkl")) == {"w": 0}
    assert torch._C.PyTorchFileReader(str(path)).get_record("data.pkl") == keyed_dict(LEVELS)  # not unpickled
    with pytest.raises(WeightsError, match="two.pt: a zip archive whose first entry does not start it"):
        read_checkpoint(path)


def test_what_torch_saves_passes(tmp_path):
    from tempme_train import checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": checkpoint.rng_states(),
             "shape": torch.Size([2, 3]), "dtype": torch.float16, "device": torch.device("cpu"), "z": 1 + 2j}
    torch.save(state, tmp_path / "state.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    weights.zip_entries(tmp_path / "state.pt")
    weights._check_legacy_pickles(tmp_path / "legacy.pt")


def scan(data: bytes) -> None:
    check_pickle_work([("it", io.BytesIO(data))])


def test_the_limit_is_on_the_parts_counted_as_a_tree():
    assert 2**23 < PICKLE_PARTS_LIMIT < 2**24
    scan(keyed_dict(22))  # the key counts 2^23 - 1 parts, the dict two more
    with pytest.raises(PickleWorkError, match="it builds or hashes more than 10,000,000 parts"):
        scan(keyed_dict(23))


def test_plain_values_of_every_protocol_pass():
    ints = [0, 1, -1, -2, 2**70, -(2**100)]  # -1 and -2 share a hash
    value = {"name": "x", "ints": ints, "again": [ints, ints], "floats": (0.5, -0.0, float("inf"), float("nan")),
             "bytes": b"\x00\xff", "bytearray": bytearray(b"ab"),
             "none": None, "flags": (True, False), "complex": 1 + 2j, "nested": {(1, (2, 3)): [("a", 1.0)]}}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        scan(pickle.dumps(value, protocol=protocol))


P = 2**61 - 1  # CPython hashes a number by its value modulo this prime (a tuple by its items' hashes)


def colliding_pairs(count: int) -> list[tuple[int, int]]:
    """Pairs (x, y) of one tuple hash, no two items of one hash: CPython's tuple hash solved for y."""
    p1, p2, p5, ring = 11400714785074694791, 14029467366897019727, 2870177450012600261, 2**64

    def rotated(value: int) -> int:
        return (value << 31 | value >> 33) % ring

    pairs, x = [], 1
    while len(pairs) < count:  # the state after x, then the y whose lane brings it to 12345 before y's rotation
        after_x = rotated((p5 + x * p2) % ring) * p1 % ring
        lane = (12345 - after_x) * pow(p2, -1, ring) % ring
        y = lane - ring if lane >= 2**63 else lane
        if abs(y) < P and y != -1:
            pairs.append((x, y))
        x += 1
    return pairs


@pytest.mark.parametrize("values", [
    [k * P for k in range(1, 10)],
    [2.0 ** (61 * k) for k in range(9)],
    [complex(10**12 - 1000003 * k, k) for k in range(9)],  # hash(real) + 1000003 * hash(imag)
    colliding_pairs(9),
], ids=["ints", "floats", "complex", "tuples"])
def test_many_distinct_numbers_of_one_hash_are_refused(values):
    # As keys of one dict, n of them take n^2 / 2 comparisons: a million, hours.
    assert len(set(values)) == 9 and len({hash(value) for value in values}) == 1
    items = [item for value in values for item in (
        value if isinstance(value, tuple) else (value.real, value.imag) if isinstance(value, complex) else ())]
    assert len({hash(item) for item in items}) == len(items)  # a tuple's or complex number's items all differ
    scan(pickle.dumps(dict.fromkeys(values[:8], "v"), protocol=2))
    with pytest.raises(PickleWorkError, match="it holds more than 8 distinct numbers or tuples of numbers with the "
                                              "same hash, unlike any checkpoint"):
        scan(pickle.dumps(values, protocol=2))


def test_a_container_filled_after_it_is_placed_in_another_is_refused():
    # L1 = [L0, L0] with L0 empty, then L0 filled: its size counted in L1's would be wrong (and with 40
    # levels of such lists, filled from the top down, L40 would be 2^40 parts counted as 81).
    with pytest.raises(PickleWorkError, match="changes a container after placing it in another"):
        scan(b"\x80\x02]q\x00]q\x01(h\x00h\x00e0K\x01a.")


def test_memo_slots_past_any_filled_are_refused():
    # C's unpickler (TorchScript archives) makes room for every slot below the one named: 32 GiB here.
    with pytest.raises(PickleWorkError, match="it puts an object in memo slot 4,294,967,295, past any it could have"):
        scan(b"\x80\x02)r\xff\xff\xff\xff.")


@pytest.mark.parametrize("data, name", [(b"\x80\x02\x82\x01.", "EXT1"), (b"\x80\x05\x97.", "NEXT_BUFFER")])
def test_opcodes_that_need_more_than_the_pickle_are_refused_by_name(data, name):
    with pytest.raises(PickleWorkError, match=f"it holds the opcode {name}, which torch does not write"):
        scan(data)


def test_a_pickle_cut_short_is_damaged():
    with pytest.raises(PickleWorkError, match="it is damaged or cut short") as info:
        scan(keyed_dict(3)[:-3])
    assert info.value.damaged


def test_a_checkpoint_of_torch_s_tar_format_is_refused_without_torch_s_advice(tmp_path):
    import tarfile

    path = tmp_path / "old.pt"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:  # as PyTorch before 0.4 wrote checkpoints
        data = pickle.dumps(0, protocol=2)
        for name in ("sys_info", "pickle", "storages", "tensors"):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    with pytest.raises(WeightsError, match="old.pt: a checkpoint in the tar format of PyTorch before 0.4, which can "
                                           "only be read with torch.load\\(weights_only=False\\), which can run") as info:
        read_checkpoint(path)
    assert "will likely succeed" not in str(info.value)


@pytest.mark.parametrize("protocol", [2, 4])
def test_sets_and_callables_no_checkpoint_needs_are_refused(protocol):
    # Sets' items are hashed as they are added, which the scan does not follow; no checkpoint holds one.
    with pytest.raises(PickleWorkError, match="holds a set|calls (__builtin__|builtins).set"):
        scan(pickle.dumps({"set": {1, 2}}, protocol=protocol))
    with pytest.raises(PickleWorkError, match="calls (__builtin__|builtins).frozenset|holds a set"):
        scan(pickle.dumps(frozenset({"a"}), protocol=protocol))
    # torch's weights-only reader allows these, but their cost is what the file names, not its size.
    with pytest.raises(PickleWorkError, match="calls (__builtin__|builtins).bytearray otherwise than pickling writes"):
        scan(pickle.dumps(Reduce(bytearray, (10**10,)), protocol=protocol))
    with pytest.raises(PickleWorkError, match="calls _codecs.encode otherwise than pickling writes bytes"):
        scan(pickle.dumps(Reduce(codecs.encode, ("x" * 100, "punycode")), protocol=protocol))
    with pytest.raises(PickleWorkError, match="calls torch._utils._rebuild_device_tensor_from_cpu_tensor"):
        scan(pickle.dumps(Reduce(torch._utils._rebuild_device_tensor_from_cpu_tensor, (1, 2)), protocol=protocol))
    with pytest.raises(PickleWorkError, match="calls torch.Size with other than one tuple or list"):
        scan(pickle.dumps(Reduce(torch.Size, ({1: None, 2: None},)), protocol=protocol))


def test_nesting_deeper_than_any_checkpoint_is_refused():
    # Hashing or printing 150,000 nested tuples crashes Python itself (C recursion with no check).
    def nested(levels: int) -> bytes:  # (((),),) ...: PROTO 2, EMPTY_TUPLE, TUPLE1 each level, STOP
        return b"\x80\x02)" + b"\x85" * (levels - 1) + b"."

    assert pickle.loads(nested(3)) == (((),),)
    with pytest.raises(PickleWorkError, match=f"nests deeper than {PICKLE_DEPTH_LIMIT} levels"):
        scan(nested(PICKLE_DEPTH_LIMIT + 1))
    scan(nested(PICKLE_DEPTH_LIMIT))  # the limit itself passes


class Reduce:
    """Pickles as ``function(*arguments)``, whatever the function does."""

    def __init__(self, function, arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


def two_directories(path) -> None:
    """A zip with two central directories: zipfile reads the zip64 end record just before the
    locator, torch's reader the one the locator points to. zipfile sees an empty state dict; torch a
    tensor whose storage is a deflated entry (compressed entries are what the checks refuse)."""
    import zlib

    out = bytearray()

    def local(name: str, data: bytes, method: int = 0, size: int | None = None, crc: int | None = None) -> tuple:
        offset, encoded = len(out), name.encode()
        crc = zlib.crc32(data) if crc is None else crc
        size = len(data) if size is None else size
        out.extend(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size,
                               len(encoded), 0) + encoded + data)
        return encoded, method, crc, len(data), size, offset

    def directory(entries) -> bytes:
        return b"".join(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, stored, size,
                                    len(name), 0, 0, 0, 0, 0, offset) + name
                        for name, method, crc, stored, size, offset in entries)

    def zip64_end(count: int, size: int, offset: int) -> bytes:
        return struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, size, offset)

    seen_by_zipfile = [local("archive/data.pkl", pickle.dumps({}, protocol=2)), local("archive/version", b"3\n")]
    zeros = b"\0" * 4096
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    stored = deflate.compress(zeros) + deflate.flush()
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4096, dtype=torch.uint8)}, buffer)
    with zipfile.ZipFile(buffer) as real:
        data_pkl = real.read(next(n for n in real.namelist() if n.endswith("data.pkl")))
    seen_by_torch = [local("archive/data.pkl", data_pkl),
                     local("archive/data/0", stored, method=8, size=len(zeros), crc=zlib.crc32(zeros)),
                     local("archive/version", b"3\n")]
    torch_directory, torch_at = directory(seen_by_torch), len(out)
    out.extend(torch_directory)
    torch_end = len(out)
    out.extend(zip64_end(len(seen_by_torch), len(torch_directory), torch_at))
    zipfile_directory, zipfile_at = directory(seen_by_zipfile), len(out)
    out.extend(zipfile_directory)
    out.extend(zip64_end(len(seen_by_zipfile), len(zipfile_directory), zipfile_at))
    out.extend(struct.pack("<IIQI", 0x07064B50, 0, torch_end, 1))  # the zip64 locator: torch's end record
    out.extend(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
    path.write_bytes(bytes(out))


def test_a_zip_that_torch_reads_otherwise_than_zipfile_is_refused(tmp_path):
    # Every check of the archive is zipfile's: torch must read the same entries at the same places.
    path = tmp_path / "two.pt"
    two_directories(path)
    with zipfile.ZipFile(path) as archive:
        assert [entry.filename for entry in archive.infolist()] == ["archive/data.pkl", "archive/version"]
    assert "data/0" in torch._C.PyTorchFileReader(str(path)).get_all_records()  # what torch.load would inflate
    with pytest.raises(WeightsError, match="a zip archive that torch reads otherwise than its directory says"):
        read_checkpoint(path)


def test_a_safetensors_file_of_more_tensors_than_any_checkpoint_is_refused(tmp_path, monkeypatch):
    # Each tensor costs microseconds and kilobytes to make: 1.5 million empty ones took 30 s and 3 GB.
    from safetensors.torch import save_file

    path = tmp_path / "many.safetensors"
    save_file({f"t{i}": torch.zeros(0) for i in range(3)}, str(path))
    monkeypatch.setattr(weights, "SAFETENSORS_TENSORS_LIMIT", 2)
    with pytest.raises(WeightsError, match="holds 3 tensors, far more than any CLIP checkpoint"):
        read_checkpoint(path)
    monkeypatch.setattr(weights, "SAFETENSORS_TENSORS_LIMIT", 3)
    assert len(read_checkpoint(path)) == 3


@pytest.mark.parametrize("protocol", [4, 5])
def test_a_checkpoint_pickled_with_protocol_4_or_5_is_named_as_such(tmp_path, protocol):
    # torch's weights-only reader takes protocol 2 and 3 only; the scan accepts every protocol.
    path = tmp_path / "p.pt"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=protocol)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own warning about the protocol is not passed on
        with pytest.raises(WeightsError, match="saved with pickle protocol 4 or later .* as safetensors"):
            read_checkpoint(path)
