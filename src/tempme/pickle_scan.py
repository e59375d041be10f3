"""A scan of a pickle's opcodes, before any unpickler sees them, for the work unpickling would take.

Weights and training states from others are pickles (torch's two file formats, TorchScript archives,
``state.pt``). The unpicklers that read them (torch's weights-only one, and tempme's own for
TorchScript) run no code, but a few kilobytes can still ask for hours or gigabytes: structures shared
2^40 ways through the memo and then hashed, numbers whose hashes collide, callables that allocate what
their argument names. :func:`check_pickle_work` follows the opcodes without building anything
(``pickletools.genops``) and refuses such a pickle; ``tempme.weights`` calls it on every pickle it reads.
"""

from __future__ import annotations

import hashlib
import pickletools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .files import first_line


#: How large anything a pickle builds may be, counted as a tree (a part it shares counted each time it
#: is reached; see :func:`check_pickle_work`), and all that unpickling hashes or hands to functions
#: together. Real checkpoints stay far below. Measured on ViT-B/16 and ViT-L/14 files (state dicts saved
#: by torch.save in both its formats, open_clip's and Hugging Face's layouts, TorchScript archives of
#: OpenAI's module tree, and tempme train's state.pt with Adam's state for every parameter), the largest
#: object counts at most 25,000 parts and all that is hashed or handed on at most 85,000 (the modules of
#: a TorchScript archive, counted at every level of nesting). A tensor is some 20 parts: 10^7 is a
#: state dict of half a million tensors. An object of 10^7 parts hashes in 30 ms and prints in a second;
#: a kilobyte of tuples each holding the one before twice counts 2^100, and hours at 2^40.
PICKLE_PARTS_LIMIT = 10_000_000

#: Distinct numbers, or tuples of them, of one hash a pickle may hold. Unlike strings', their hashes
#: are the same in every run, so a file can hold many that collide, and a dict or set of n of them
#: takes n^2 / 2 comparisons to fill (a million keys: hours). Real files hold one or two of a hash
#: (-1 and -2 share theirs).
_SAME_HASH_LIMIT = 8

# Callables, as pickles name them, whose result hashes as a value (not by identity, a salted hash, or
# not at all, as tensors, storages, lists, dicts, bytes and scripted modules do): of those the
# unpicklers here accept, these.
_TUPLE_CALLS = frozenset({"torch.Size"})  # the tuple of its argument's items (a tuple or list, nothing else)
_COMPLEX_CALLS = frozenset({"builtins.complex", "__builtin__.complex"})
_PASSING_CALLS = frozenset({"torch.jit._pickle.restore_type_tag"})  # its first argument

# Callables that torch's weights-only unpickler accepts but no checkpoint this project reads needs,
# whose work or memory no count of parts bounds: a bytearray or tensor of a size the file merely names
# (gigabytes from a few bytes), a zero-stride view copied out whole, a codec of quadratic cost.
_REFUSED_CALLS = frozenset({
    "torch.Tensor", "torch._utils._rebuild_device_tensor_from_cpu_tensor", "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_sparse_tensor", "torch._utils._rebuild_nested_tensor",
    "torch._utils._rebuild_wrapper_subclass", "torch._utils._rebuild_meta_tensor_no_storage",
    "collections.Counter", "builtins.set", "__builtin__.set", "builtins.frozenset", "__builtin__.frozenset",
})
# Allowed only as pickling writes bytes before protocol 3: from a string, in latin1.
_BYTES_CALLS = frozenset({"builtins.bytearray", "__builtin__.bytearray", "_codecs.encode"})
_LATIN1 = frozenset({"latin1", "latin-1"})
#: How deep anything a pickle builds may nest. Checkpoints nest a few levels; hashing or printing a
#: structure nested a hundred thousand deep crashes Python (C recursion, no check).
PICKLE_DEPTH_LIMIT = 1000
#: Opcodes in the pickles of one file. A ViT-L/14 checkpoint's pickle has some 18,000 and a training
#: state with Adam's moments some 58,000; the scan spends microseconds and a few hundred bytes on each.
PICKLE_OPCODES_LIMIT = 1_000_000

_NUMBERS = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"})
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_STRINGS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
                      "BYTEARRAY8", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"})
_TUPLES = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_CHANGES = {"APPEND": 0, "APPENDS": 0, "SETITEM": 2, "SETITEMS": 2, "BUILD": 1}  # hashing every nth


class PickleWorkError(ValueError):
    """A pickle that would take far longer to unpickle than any checkpoint does, or a damaged one
    (``damaged``), as :func:`check_pickle_work` found it."""

    def __init__(self, message: str, damaged: bool):
        super().__init__(message)
        self.damaged = damaged


@dataclass(eq=False, slots=True)
class _Part:
    """An object a pickle builds, as :func:`check_pickle_work` sees it."""

    size: int  # 1, plus its parts' sizes (a part reached twice counted twice)
    key: str | None = None  # a number's or a tuple of numbers': one per distinct value of its hash
    hash: int = 0  # with ``key``: that value's hash, as Python gives it in this process
    value: Any = None  # a number's or string's value; a global's "module.name"
    items: list[_Part] | None = None  # a tuple's or list's parts
    taken: bool = False  # a part of another object now: it may change no more
    depth: int = 1  # 1, plus its deepest part's


class _Hashed:
    """Hashes as the value it stands for (a tuple of these hashes as the tuple of the values)."""

    __slots__ = ("hash",)

    def __init__(self, value: int):
        self.hash = value

    def __hash__(self) -> int:
        return self.hash


class _PickleScan:
    """What :func:`check_pickle_work` keeps across the pickles of one file."""

    def __init__(self) -> None:
        self.what = "the pickle"
        self.work = 0  # the sizes of what unpickling hashes or hands to a function
        self.opcodes = 0
        self.by_hash: dict[int, list[Any]] = {}  # hash -> its distinct numbers and tuple digests

    def refuse(self, problem: str, damaged: bool = False) -> PickleWorkError:
        if damaged:
            return PickleWorkError(f"{self.what} is damaged or cut short ({problem})", damaged=True)
        return PickleWorkError(f"{self.what} {problem} (a damaged or crafted file)", damaged=False)

    def grow(self, part: _Part, parts: list[_Part], hashed: list[_Part]) -> None:
        """``part`` takes in ``parts``, ``hashed`` of them hashed or handed to a function."""
        for taken in parts:
            taken.taken = True
            part.depth = max(part.depth, taken.depth + 1)
        if part.depth > PICKLE_DEPTH_LIMIT:
            raise self.refuse(f"nests deeper than {PICKLE_DEPTH_LIMIT} levels, unlike any checkpoint: unpickling or "
                              "hashing it could crash Python")
        part.size += sum(taken.size for taken in parts)
        self.work += sum(taken.size for taken in hashed)
        if part.size > PICKLE_PARTS_LIMIT or self.work > PICKLE_PARTS_LIMIT:
            raise self.refuse(f"builds or hashes more than {PICKLE_PARTS_LIMIT:,} parts, counting a part it shares "
                              "each time it is reached: far more than any checkpoint, which could take hours to "
                              "unpickle")

    def new(self, parts: list[_Part], hashed: bool = False, **fields: Any) -> _Part:
        made = _Part(1, **fields)
        self.grow(made, parts, parts if hashed else [])
        return made

    def keyed(self, value_hash: int, value: Any) -> str:
        """The key of ``value`` (a number, or a tuple's digest): its hash and its place among those of it."""
        values = self.by_hash.setdefault(value_hash, [])
        if value not in values:  # (numbers and bytes compare without fail, and at most this few)
            values.append(value)
            if len(values) > _SAME_HASH_LIMIT:
                raise self.refuse(f"holds more than {_SAME_HASH_LIMIT} distinct numbers or tuples of numbers with the "
                                  "same hash, unlike any checkpoint: as keys of a dict or set they could take hours "
                                  "to unpickle")
        return f"{value_hash}:{values.index(value)}"

    def number(self, value: Any) -> _Part:
        value_hash = hash(value)
        return _Part(1, key=self.keyed(value_hash, value), hash=value_hash, value=value)

    def tuple_of(self, items: list[_Part]) -> _Part:
        made = self.new(items, items=list(items))
        if all(item.key is not None for item in items):
            made.hash = hash(tuple(_Hashed(item.hash) for item in items))
            digest = hashlib.blake2b(",".join(item.key for item in items).encode(), digest_size=16).digest()
            made.key = self.keyed(made.hash, digest)
        return made

    def call(self, function: _Part, arguments: list[_Part]) -> _Part:
        """What REDUCE, NEWOBJ and the like make: no larger than the function and arguments, which it may hash."""
        made = self.new([function, *arguments], hashed=True)
        given = arguments[0].items or [] if arguments else []
        name = function.value
        if name in _REFUSED_CALLS or (isinstance(name, str) and name.startswith("torch.") and name.endswith("Tensor")):
            raise self.refuse(f"calls {name}, which no checkpoint needs and whose work or memory the file does not "
                              "bound")
        if name in _BYTES_CALLS:
            if not (1 <= len(given) <= 2 and isinstance(given[0].value, (str, bytes))
                    and (len(given) == 1 or given[1].value in _LATIN1)):
                raise self.refuse(f"calls {name} otherwise than pickling writes bytes (from a string, in latin1)")
            made.value = b""  # bytes, as long as the string the file holds
        if name in _TUPLE_CALLS and not (len(given) == 1 and given[0].items is not None):
            raise self.refuse(f"calls {name} with other than one tuple or list")
        like = None
        if function.value in _TUPLE_CALLS and len(given) == 1 and given[0].items is not None:
            like = self.tuple_of(given[0].items)
        elif function.value in _PASSING_CALLS and given:
            like = given[0]
        elif function.value in _COMPLEX_CALLS and all(isinstance(item.value, (int, float, str)) for item in given):
            try:
                number = complex(*(item.value for item in given))
            except (TypeError, ValueError, OverflowError):  # the unpickler fails on them too
                number = None
            like = None if number is None else self.number(number)
        if like is not None:
            made.key, made.hash = like.key, like.hash
        return made

    def read(self, stream: Any) -> None:
        """Follow one pickle in ``stream`` (with ``read`` and ``readline``), up to its STOP."""
        stack: list[_Part] = []
        marks: list[int] = []  # where each MARK left the stack
        memo: dict[int, _Part] = {}

        def pop(count: int = 1) -> list[_Part]:
            if len(stack) - count < (marks[-1] if marks else 0):
                raise self.refuse("it takes more from its stack than there is", damaged=True)
            taken = stack[len(stack) - count:]
            del stack[len(stack) - count:]
            return taken

        def pop_mark() -> list[_Part]:
            if not marks:
                raise self.refuse("it takes from a MARK it has not made", damaged=True)
            taken = stack[marks[-1]:]
            del stack[marks.pop():]
            return taken

        def top() -> _Part:
            stack.extend(pop())
            return stack[-1]

        try:
            for count, (opcode, arg, _) in enumerate(pickletools.genops(stream)):
                self.opcodes += 1
                if self.opcodes > PICKLE_OPCODES_LIMIT:
                    raise self.refuse(f"holds more than {PICKLE_OPCODES_LIMIT:,} opcodes, far more than any checkpoint")
                name = opcode.name
                if name in _NUMBERS or name in _CONSTANTS:
                    stack.append(self.number(arg if name in _NUMBERS else _CONSTANTS[name]))
                elif name in _STRINGS:
                    stack.append(_Part(1, value=arg))
                elif name in ("EMPTY_SET", "FROZENSET", "ADDITEMS"):  # their items' hashes the scan does not follow
                    raise self.refuse("holds a set, which no checkpoint does")
                elif name in ("EMPTY_LIST", "EMPTY_DICT"):
                    stack.append(_Part(1, items=[] if name == "EMPTY_LIST" else None))
                elif name in ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE"):
                    stack.append(self.tuple_of(pop_mark() if name == "TUPLE" else pop(_TUPLES[name])))
                elif name in ("LIST", "DICT"):
                    items = pop_mark()
                    stack.append(self.new(items, hashed=name != "LIST", items=items if name == "LIST" else None))
                elif name in _CHANGES:
                    parts = pop_mark() if name.endswith("S") else pop(2 if name == "SETITEM" else 1)
                    target = top()
                    if target.taken:
                        raise self.refuse("changes a container after placing it in another, which pickling never does")
                    if name.startswith("APPEND") and target.items is not None:
                        target.items.extend(parts)
                    self.grow(target, parts, parts[::_CHANGES[name]] if _CHANGES[name] else [])
                elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
                    function, *arguments = pop(3 if name == "NEWOBJ_EX" else 2)
                    stack.append(self.call(function, arguments))
                elif name in ("OBJ", "INST"):
                    parts = pop_mark()
                    if name == "INST":
                        parts.insert(0, _Part(1, value=arg.replace(" ", ".")))
                    if not parts:
                        raise self.refuse("an OBJ without its class", damaged=True)
                    stack.append(self.call(parts[0], [self.tuple_of(parts[1:])]))
                elif name in ("BINPERSID", "PERSID"):
                    stack.append(self.new(pop() if name == "BINPERSID" else [_Part(1, value=arg)], hashed=True))
                elif name == "GLOBAL":
                    stack.append(_Part(1, value=arg.replace(" ", ".")))
                elif name == "STACK_GLOBAL":
                    module, attribute = pop(2)
                    stack.append(_Part(1, value=f"{module.value}.{attribute.value}"))
                elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    index = len(memo) if name == "MEMOIZE" else arg
                    # Pickles fill their memo from slot 0 up; C's unpickler makes room for every slot below the
                    # one named.
                    if not 0 <= index <= count:
                        raise self.refuse(f"puts an object in memo slot {index:,}, past any it could have filled, "
                                          "for which unpickling could take gigabytes")
                    memo[index] = top()
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    if arg not in memo:
                        raise self.refuse(f"it reads memo slot {arg}, which it has not filled", damaged=True)
                    stack.append(memo[arg])
                elif name == "MARK":
                    marks.append(len(stack))
                elif name == "POP" and marks and marks[-1] == len(stack):
                    marks.pop()  # as C's unpickler does
                elif name in ("POP", "POP_MARK"):
                    pop() if name == "POP" else pop_mark()
                elif name == "DUP":
                    stack.append(top())
                elif name == "STOP":
                    top()  # the pickle's object (checked as it was built)
                elif name not in ("PROTO", "FRAME"):
                    raise self.refuse(f"holds the opcode {name}, which torch does not write")
        except PickleWorkError:
            raise
        except (ValueError, UnicodeError, OverflowError, MemoryError) as err:  # genops's for damaged pickles
            raise self.refuse(first_line(err), damaged=True) from None


def check_pickle_work(pickles: Iterable[tuple[str, Any]], /) -> None:
    """Refuse (:class:`PickleWorkError`) pickles that would take far longer to unpickle, or to hash
    or print once unpickled, than any checkpoint: read before any unpickler sees them, each of
    ``pickles`` a (name for messages, file with ``read`` and ``readline``), read up to its STOP.

    The opcodes are followed without building anything (``pickletools.genops``): each object stands
    for its size as a tree, 1 for a number or string, 1 plus its parts' for a container or what a
    call makes, a part reached twice through the memo counted twice. That is the work of hashing,
    comparing, printing or walking it; a kilobyte of tuples each holding the one before twice is
    2^100. Nothing may be larger than ``PICKLE_PARTS_LIMIT``, nor may all that unpickling hashes or
    hands to functions be together. Also refused: more than a few distinct numbers or tuples of them
    of one hash (they are the same in every run, and dicts and sets fill with n that collide in time
    n^2); a container changed after another took it in (its size counted already); memo slots far
    past those filled (C's unpickler makes room for all below); and opcodes that need more than the
    pickle (extensions, out-of-band buffers)."""
    scan = _PickleScan()  # one for all the pickles of a file (legacy torch files hold several)
    for scan.what, stream in pickles:
        scan.read(stream)


class BoundedReader:
    """A file's ``read`` and ``readline`` that ask it for no more than its ``left`` bytes (genops
    reads the length a pickle claims for a string in one call, which a file allocates first)."""

    def __init__(self, file: Any, left: int):
        self.file, self.left = file, left

    def read(self, size: int) -> bytes:
        data = self.file.read(max(0, min(size, self.left)))
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.file.readline(self.left)
        self.left -= len(line)
        return line
