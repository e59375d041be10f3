"""CLIP's byte-level BPE tokenizer, usable offline.

Reproduces the token ids of OpenAI CLIP's ``simple_tokenizer`` using the
BPE merge table shipped with this package (``bpe_simple_vocab_16e6.txt.gz``).
Text is cleaned (ftfy, HTML unescaping, whitespace collapsing, lowercasing),
split with CLIP's regex, mapped byte-wise to printable unicode characters and
then merged with byte-pair encoding.
"""

from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import regex
import torch

from .config import MIN_WORDS

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")

SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"

# CLIP uses the first 49152 - 256 - 2 merges: together with the 256 byte
# symbols, their 256 word-final variants and the 2 special tokens this gives
# a vocabulary of exactly 49408 entries.
NUM_MERGES = 49152 - 256 - 2

WORD_END = "</w>"

_TOKEN_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte value 0..255 to a printable, non-whitespace character.

    Printable Latin-1 bytes map to themselves; the remaining bytes (control
    characters, space, ...) are shifted to code points 256 and up, in byte
    order. BPE then works on strings without ever seeing whitespace or
    control characters, which would clash with the space-separated merge file.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def clean_text(text: str) -> str:
    """Normalise text the way CLIP does before splitting it into words.

    HTML is unescaped twice because captions scraped from the web are often
    double-escaped (``&amp;amp;`` -> ``&amp;`` -> ``&``).
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower()


def _load_merges(path: Path) -> list[tuple[str, str]]:
    """Read the merge rules; line 0 of the file is a version header."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every non-overlapping occurrence of ``pair``, left to right."""
    merged = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


class Tokenizer:
    """CLIP BPE tokenizer with CLIP4Clip-style padding to a fixed length.

    Args:
        vocab_path: gzip'd merge file; defaults to the one shipped with tempme.
        cache_size: number of distinct words whose BPE result is memoised.
    """

    def __init__(self, vocab_path: str | Path | None = None, cache_size: int = 65536):
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}

        merges = _load_merges(Path(vocab_path) if vocab_path is not None else VOCAB_PATH)
        self._merge_ranks = {pair: rank for rank, pair in enumerate(merges)}

        byte_symbols = list(self._byte_encoder.values())
        vocab = (
            byte_symbols
            + [s + WORD_END for s in byte_symbols]
            + ["".join(pair) for pair in merges]
            + [SOT_TEXT, EOT_TEXT]
        )
        self._encoder = {token: i for i, token in enumerate(vocab)}
        self._decoder = dict(enumerate(vocab))

        self.sot_token_id = self._encoder[SOT_TEXT]
        self.eot_token_id = self._encoder[EOT_TEXT]
        self._bpe = functools.lru_cache(maxsize=cache_size)(self._bpe_uncached)

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        """Split one byte-encoded word into vocabulary symbols.

        The last character carries the word-end marker so that word-final
        pieces get their own ids. Merges are applied lowest rank first until
        no adjacent pair has a rule.
        """
        if word in (SOT_TEXT, EOT_TEXT):
            return (word,)
        symbols = tuple(word[:-1]) + (word[-1] + WORD_END,)
        while len(symbols) > 1:
            pairs = zip(symbols, symbols[1:])
            best = min(pairs, key=lambda p: self._merge_ranks.get(p, float("inf")))
            if best not in self._merge_ranks:
                break
            symbols = _merge_pair(symbols, best)
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without start/end-of-text tokens."""
        ids = []
        for word in _TOKEN_PATTERN.findall(clean_text(text)):
            byte_word = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self._encoder[symbol] for symbol in self._bpe(byte_word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens appear as their literal text.

        Word boundaries are restored from the word-end markers, and the
        result is stripped so that ``decode(encode(t)) == t`` for cleaned text.
        """
        symbols = []
        for i in ids:
            i = int(i)
            if i not in self._decoder:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            symbols.append(self._decoder[i])
        # Special tokens and the word-end marker are printable ASCII, which the
        # byte map leaves unchanged, so they pass through byte decoding intact.
        data = bytearray(self._byte_decoder[c] for c in "".join(symbols))
        text = data.decode("utf-8", errors="replace")
        return text.replace(WORD_END, " ").strip()

    def __call__(
        self, texts: str | Sequence[str], max_words: int = 32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad a batch of texts.

        Each row is ``[SOT] + tokens[: max_words - 2] + [EOT]`` followed by
        zeros, so over-long texts are truncated but still end with EOT (the
        CLIP text encoder pools at the EOT position).

        Returns:
            ids: LongTensor [N, max_words].
            mask: LongTensor [N, max_words], 1 on SOT, text tokens and EOT,
                0 on padding.
        """
        if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < MIN_WORDS:
            raise ValueError(
                f"max_words must be an int >= {MIN_WORDS} (room for SOT, one token and EOT), "
                f"got {max_words!r}"
            )
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.zeros(len(texts), max_words, dtype=torch.long)
        mask = torch.zeros(len(texts), max_words, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.sot_token_id] + self.encode(text)[: max_words - 2] + [self.eot_token_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """Shared tokenizer instance; loading the merge table takes ~1 s."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], max_words: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize with the shared tokenizer; see :meth:`Tokenizer.__call__`."""
    return get_tokenizer()(texts, max_words=max_words)
