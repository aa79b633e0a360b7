"""``dymoe serve`` defaults, declared once (the CLI shows them in --help), and the options of
one server. Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports these defaults for --help: nothing heavy at import time
    from dymoe.runtime.policy_config import PolicyRun

HOST = "127.0.0.1"  # loopback: reachable from this device only, unless the user says otherwise
PORT = 8000
API_KEY_ENV = "DYMOE_API_KEY"
QUEUE_SIZE = 8  # requests that may wait while one generates; one more is answered 429 at once
MAX_BODY_BYTES = 1 << 20  # a request body larger than this is answered 413 unread
MAX_TOKENS = 512  # the most a request may ask for, and what it gets when it names no max_tokens
MAX_STOP = 4  # stop strings per request, as in OpenAI's API
BODY_TIMEOUT_S = 30.0  # a client that takes longer to send its body is answered 408
DRAIN_TIMEOUT_S = 60.0  # SIGTERM: how long running and queued requests may finish before they are cancelled
MAX_CONNECTIONS = 128  # open connections beyond this are answered 503 by the HTTP layer
KEEP_ALIVE_S = 5  # idle keep-alive connections are closed after this
MAX_HEADER_BYTES = 64 << 10
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when a request names none (0 is greedy)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass
class ServeOptions:
    host: str = HOST
    port: int = PORT
    model_name: str | None = None  # the id clients pass as "model" (default: the bundle folder's name)
    api_key: str | None = None  # when set, every request needs "Authorization: Bearer <key>"
    queue_size: int = QUEUE_SIZE
    max_body_bytes: int = MAX_BODY_BYTES
    max_tokens: int = MAX_TOKENS
    max_prompt_tokens: int | None = None  # default: the model's context less one token
    body_timeout_s: float = BODY_TIMEOUT_S
    drain_timeout_s: float = DRAIN_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    chat_template: Path | None = None  # a Jinja file replacing the bundle's template
    precision: str | None = None  # every expert resident at this precision (when policy is None)
    policy: PolicyRun | None = None  # a memory-budgeted run
    log_level: str = "info"
    access_log: bool = True
