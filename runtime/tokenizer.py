"""The bundle's tokenizer (Hugging Face ``tokenizers``), with incremental detokenisation for
streaming: text is released only once the bytes decoded so far form whole characters."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from dymoe.bundle.errors import InputError


class TextTokenizer:
    def __init__(self, path: Path) -> None:
        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes the shell could not decode arrive as lone surrogates
            raise InputError(f"the text is not valid UTF-8 (an undecodable byte at character {e.start})",
                             "pass the prompt as UTF-8 text") from None
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Feed token ids one by one; get back the newly completed text each time."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        # a multi-byte character split across tokens decodes to U+FFFD until it is complete
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return new
