"""The bundle's tokenizer (Hugging Face ``tokenizers``), with incremental detokenisation for
streaming: text is released only once the bytes decoded so far form whole characters."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from dymoe.bundle.errors import InputError


class TextTokenizer:
    def __init__(self, path: Path) -> None:
        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``add_special_tokens=False`` for text a chat template rendered: the template already
        wrote the special tokens it wants (as transformers' ``apply_chat_template`` does)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes the shell could not decode arrive as lone surrogates
            raise InputError(f"the text is not valid UTF-8 (an undecodable byte at character {e.start})",
                             "pass the prompt as UTF-8 text") from None
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def stream(self) -> StreamDecoder:
        """An incremental decoder for tokens arriving one at a time."""
        return StreamDecoder(self._tok)


class StreamDecoder:
    """Feed token ids one by one; get back the newly completed text each time. Incremental
    (tokenizers' ``DecodeStream``: constant work per token, not a re-decode of the whole text),
    and a character split across tokens is released once its bytes are complete."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._stream.step(self._tok, token_id) or ""
