"""One request to what the worker runs: the prompt's token ids (a chat request through the chat
template first) and its sampling, checked against the server's limits and the model's context
before it may queue. Runs outside the event loop (templates and tokenisation take CPU time)."""

from __future__ import annotations

from dataclasses import dataclass

from dymoe.bundle.errors import InputError
from dymoe.runtime.chat_template import ChatTemplate
from dymoe.runtime.tokenizer import TextTokenizer

from .errors import ApiError, bad_request
from .protocol import CHAT, Params, check_model, parse_messages, parse_params, parse_prompt


@dataclass
class GenRequest:
    kind: str  # protocol.CHAT or protocol.COMPLETION
    prompt_ids: list[int]
    params: Params
    max_tokens: int  # resolved: what was asked, or what the server and the context allow


@dataclass
class Limits:
    context: int  # the model's max_position_embeddings: prompt and completion together
    vocab_size: int
    max_prompt_tokens: int
    max_tokens: int


class Preparer:
    def __init__(self, tokenizer: TextTokenizer, template: ChatTemplate | None, limits: Limits, model_id: str) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.limits = limits
        self.model_id = model_id

    def __call__(self, kind: str, body: dict) -> GenRequest:
        check_model(body, self.model_id)
        params = parse_params(body, self.limits.max_tokens)
        try:
            ids = self._chat_ids(body) if kind == CHAT else self._prompt_ids(body)
        except InputError as e:  # the template refused the messages, or text that is not UTF-8
            raise bad_request(e.message, "messages" if kind == CHAT else "prompt") from None
        return GenRequest(kind, ids, params, self._max_tokens(len(ids), params))

    def _chat_ids(self, body: dict) -> list[int]:
        if self.template is None:
            raise ApiError(400, f"the model {self.model_id!r} has no chat template, so chat requests cannot be "
                                "rendered; use /v1/completions, or start dymoe serve with --chat-template FILE",
                           "no_chat_template", "messages")
        text = self.template.render(parse_messages(body))
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template wrote its special tokens

    def _prompt_ids(self, body: dict) -> list[int]:
        prompt = parse_prompt(body)
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        bad = [t for t in prompt if not 0 <= t < self.limits.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{self.limits.vocab_size - 1})",
                              "prompt")
        return list(prompt)

    def _max_tokens(self, n_prompt: int, params: Params) -> int:
        lim = self.limits
        if n_prompt == 0:
            raise bad_request("the prompt is empty after tokenisation", "prompt")
        if n_prompt > lim.max_prompt_tokens:
            raise bad_request(f"the prompt has {n_prompt} tokens; this server accepts at most "
                              f"{lim.max_prompt_tokens}", "prompt", "context_length_exceeded")
        room = lim.context - n_prompt  # generate() ends at the context: prompt + completion <= context
        if params.max_tokens is None:
            return min(lim.max_tokens, room)
        if params.max_tokens > room:
            raise bad_request(f"this model's context is {lim.context} tokens; the prompt has {n_prompt} and "
                              f"max_tokens asks for {params.max_tokens} more", "max_tokens",
                              "context_length_exceeded")
        return params.max_tokens
