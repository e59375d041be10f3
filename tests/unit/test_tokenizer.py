"""Tokenizer tests. Expected ids are CLIP's published outputs, not ours."""

import pytest
import torch

from tempme.tokenizer import Tokenizer, get_tokenizer, tokenize

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_tokenizer()


def test_special_token_ids(tok):
    assert tok.sot_token_id == SOT
    assert tok.eot_token_id == EOT
    assert tok.vocab_size == 49408


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a diagram", [SOT, 320, 22697, EOT]),
        ("hello world", [SOT, 3306, 1002, EOT]),
        (
            "a person is connecting something to system",
            [SOT, 320, 2533, 533, 41429, 2006, 531, 2422, EOT],
        ),
    ],
)
def test_known_clip_ids(tok, text, expected):
    ids, mask = tok(text, max_words=len(expected))
    assert ids[0].tolist() == expected
    assert mask[0].tolist() == [1] * len(expected)
    assert tok.encode(text) == expected[1:-1]


def test_padding_and_mask_shapes(tok):
    ids, mask = tok(["a diagram", "hello world", "a person is connecting something to system"])
    assert ids.shape == mask.shape == (3, 32)
    assert ids.dtype == mask.dtype == torch.long
    # "a diagram": SOT a diagram EOT, then 28 zeros.
    assert ids[0, :4].tolist() == [SOT, 320, 22697, EOT]
    assert ids[0, 4:].eq(0).all()
    assert mask[0].tolist() == [1] * 4 + [0] * 28
    assert mask.sum(dim=1).tolist() == [4, 4, 9]


def test_truncation_keeps_eot_last(tok):
    ids, mask = tok("a person is connecting something to system", max_words=5)
    # SOT + first 3 text tokens (a, person, is) + EOT.
    assert ids[0].tolist() == [SOT, 320, 2533, 533, EOT]
    assert mask[0].tolist() == [1, 1, 1, 1, 1]


def test_minimum_length_keeps_one_token(tok):
    ids, mask = tok("hello world", max_words=3)
    assert ids[0].tolist() == [SOT, 3306, EOT]
    assert mask[0].tolist() == [1, 1, 1]


def test_empty_text_is_sot_eot(tok):
    ids, mask = tok("", max_words=4)
    assert ids[0].tolist() == [SOT, EOT, 0, 0]
    assert mask[0].tolist() == [1, 1, 0, 0]


def test_html_entities_unescaped_twice(tok):
    assert tok.encode("&amp;amp;") == tok.encode("&")
    assert tok.encode("rock &amp;amp; roll") == tok.encode("rock & roll")


def test_html_entities_unescaped_twice_inside_markup(tok):
    # ftfy leaves entities alone when the text looks like HTML, so here only
    # the two explicit unescapes turn "&amp;amp;" into "&".
    assert tok.encode("<i>rock &amp;amp; roll</i>") == tok.encode("<i>rock & roll</i>")


def test_whitespace_collapsed(tok):
    assert tok.encode("  hello \t\n  world  ") == [3306, 1002]


def test_case_insensitive(tok):
    assert tok.encode("HELLO World") == [3306, 1002]
    assert tok.encode("A DIAGRAM") == tok.encode("a diagram")


@pytest.mark.parametrize(
    "text",
    ["a diagram", "a person is connecting something to system", "the quick brown fox jumps"],
)
def test_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_rejects_unknown_id(tok):
    with pytest.raises(ValueError, match="49408"):
        tok.decode([49408])


@pytest.mark.parametrize("bad", [2, 0, -1])
def test_max_words_too_small(tok, bad):
    with pytest.raises(ValueError, match=f"got {bad}"):
        tok("hello world", max_words=bad)


def test_single_string_and_list_agree(tok):
    single_ids, single_mask = tok("hello world", max_words=8)
    list_ids, list_mask = tok(["hello world"], max_words=8)
    assert single_ids.shape == (1, 8)
    assert torch.equal(single_ids, list_ids)
    assert torch.equal(single_mask, list_mask)


def test_module_helpers_share_instance():
    assert get_tokenizer() is get_tokenizer()
    ids, mask = tokenize(["a diagram"], max_words=6)
    assert ids[0].tolist() == [SOT, 320, 22697, EOT, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0]
