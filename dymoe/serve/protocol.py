"""OpenAI's request fields in, its response objects out: the wire format of
``/v1/completions`` and ``/v1/chat/completions``, validated field by field (a bad field is a 400
naming it), with nothing about models or threads."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from .errors import ApiError, bad_request
from .options import DEFAULT_TEMPERATURE, MAX_STOP

CHAT = "chat"
COMPLETION = "completion"
# accepted when absent, null or one of these values only: anything else would change the answer
# without the client knowing
UNSUPPORTED = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False,), "top_logprobs": (0,),
               "suffix": ("",), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
               "tools": ([],), "functions": ([],)}


@dataclass
class Params:
    max_tokens: int | None  # None: as many as the server allows and the context holds
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_params(body: dict, max_tokens_limit: int) -> Params:
    for name, allowed in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value not in allowed:
            raise bad_request(f"{name}={value!r} is not supported by this server (only {allowed[0]!r})", name,
                              "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad_request("response_format: only {'type': 'text'} is supported", "response_format",
                          "unsupported_parameter")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, name, lo=1)
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise bad_request(f"{name} is {max_tokens}, more than this server allows ({max_tokens_limit})", name)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _int(body, "seed")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    include_usage = _bool(options or {}, "include_usage", "stream_options.include_usage")
    return Params(max_tokens=max_tokens, temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
                  top_p=1.0 if top_p is None else top_p, seed=None if seed is None else seed % 2**64,
                  stop=_stop(body), stream=bool(stream), include_usage=bool(include_usage))


def parse_prompt(body: dict) -> str | list[int]:
    """``prompt``: a string, token ids, or a list holding one of those (one prompt per request)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if prompt is None:
        raise bad_request("prompt is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise bad_request("one prompt per request: send the prompts as separate requests", "prompt")
    raise bad_request("prompt must be a string or a list of token ids", "prompt")


def parse_messages(body: dict) -> list[dict]:
    """``messages`` as chat templates expect them: role and string content (text parts joined)."""
    messages = body.get("messages")
    if messages is None:
        raise bad_request("messages is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"{where} must be an object with a string 'role'", where)
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad_request(f"{where}.content[{j}]: only text parts are supported", f"{where}.content")
                parts.append(part["text"])
            content = "\n".join(parts)
        elif content is None and m["role"] == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        message = {"role": m["role"], "content": content}
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        out.append(message)
    return out


def check_model(body: dict, model_id: str) -> None:
    model = body.get("model")
    if model is not None and model != model_id:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_id!r}", "model_not_found",
                       "model")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad_request(f"stop has {len(stops)} strings; at most {MAX_STOP}", "stop")
    if any(not s for s in stops):
        raise bad_request("stop strings must not be empty", "stop")
    return stops


def _bool(body: dict, name: str, label: str | None = None) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{label or name} must be true or false", label or name)
    return value


def _int(body: dict, name: str, lo: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer", name)
    if lo is not None and value < lo:
        raise bad_request(f"{name} is {value}; it must be at least {lo}", name)
    return value


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number", name)
    if not lo <= value <= hi:
        raise bad_request(f"{name} is {value}; it must lie in [{lo:g}, {hi:g}]", name)
    return float(value)


# --- responses ------------------------------------------------------------------------------


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Responder:
    """The response objects of one request, all sharing its id, creation time and model."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind = kind
        self.model = model
        self.id = ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        if self.kind == CHAT:
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False,
              include_usage: bool = False) -> dict:
        out = self._head("chat.completion.chunk" if self.kind == CHAT else "text_completion")
        out["choices"] = [self._choice(text, finish, first)]
        if include_usage:  # OpenAI sends "usage": null on every chunk before the usage chunk
            out["usage"] = None
        return out

    def usage_chunk(self, usage: Usage) -> dict:
        out = self._head("chat.completion.chunk" if self.kind == CHAT else "text_completion")
        out.update(choices=[], usage=usage.as_dict())
        return out

    def full(self, text: str, finish: str, usage: Usage) -> dict:
        out = self._head("chat.completion" if self.kind == CHAT else "text_completion")
        if self.kind == CHAT:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        out.update(choices=[choice], usage=usage.as_dict())
        return out
