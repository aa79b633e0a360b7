"""Streaming detokenisation (tokenizers' DecodeStream, constant work per token): what is
printed token by token is exactly the decoded text, also when a character's bytes are split
across tokens."""

from __future__ import annotations

import pytest

from dymoe.bundle.errors import InputError
from dymoe.demo import demo_model_dir
from dymoe.runtime.tokenizer import TextTokenizer

TEXTS = ["The for statement is used to iterate", "naïve café — 中文字符 and emoji 🙂🚀!", "\n\n  indented\tcode()"]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer(demo_model_dir() / "tokenizer.json")


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_join_to_the_decoded_text(tok, text):
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    if any(ord(c) > 127 for c in text):
        assert "" in pieces  # some token ended mid-character and was held back


def test_text_that_is_not_utf8_is_refused(tok):
    with pytest.raises(InputError, match="not valid UTF-8"):
        tok.encode("abc \udcff def")  # an undecodable byte from the shell arrives as a lone surrogate
