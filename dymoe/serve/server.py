"""Start ``dymoe serve``: check what can be checked at once (the bundle's manifest, tokenizer and
chat template, the address), listen, load the model in the background (``/health`` answers 503
until it is ready), and serve until SIGTERM or Ctrl-C, which stop accepting connections, let
running and queued requests finish (up to the drain timeout), and exit."""

from __future__ import annotations

import errno
import ipaddress
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from dymoe.bundle.errors import DymoeError, InputError

from .options import LOG_LEVELS, ServeOptions


def require_serve_extra() -> None:
    """Fail early, in two lines, when the ``serve`` extra is not installed."""
    missing = []
    for module in ("uvicorn", "jinja2"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise DymoeError(f"dymoe serve needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                         "not installed", "pip install 'dymoe[serve]'")


def check_options(opts: ServeOptions) -> None:
    checks = [
        (0 <= opts.port <= 65535, f"--port {opts.port}", "use 0 (any free port) to 65535"),
        (opts.queue_size >= 0, f"--queue-size {opts.queue_size}", "use 0 (no waiting) or more"),
        (opts.max_body_bytes >= 1024, f"--max-body-bytes {opts.max_body_bytes}", "use at least 1024"),
        (opts.max_tokens >= 1, f"--max-tokens {opts.max_tokens}", "use at least 1"),
        (opts.max_prompt_tokens is None or opts.max_prompt_tokens >= 1, f"--max-prompt-tokens "
         f"{opts.max_prompt_tokens}", "use at least 1"),
        (opts.body_timeout_s > 0, f"--body-timeout {opts.body_timeout_s}", "use a positive number of seconds"),
        (opts.drain_timeout_s >= 0, f"--drain-timeout {opts.drain_timeout_s}", "use 0 or more seconds"),
        (opts.max_connections >= 1, f"--max-connections {opts.max_connections}", "use at least 1"),
        (opts.log_level in LOG_LEVELS, f"--log-level {opts.log_level}", f"choose {', '.join(LOG_LEVELS)}"),
        (opts.api_key is None or opts.api_key.strip() != "", "an empty API key", "give a non-empty key, or none"),
    ]
    for ok, what, hint in checks:
        if not ok:
            raise InputError(f"invalid option: {what}", hint)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a clean error, not a log line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"--host {host} is not an address of this machine ({e.strerror})",
                         "use 127.0.0.1 (this device only) or 0.0.0.0 (every interface)") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is already in use", "choose another --port") from None
        if e.errno == errno.EACCES:
            raise InputError(f"no permission to listen on port {port}", "use a port above 1023") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise InputError(f"--host {host} is not an address of this machine",
                             "use 127.0.0.1 (this device only) or 0.0.0.0 (every interface)") from None
        raise
    sock.setblocking(False)
    return sock


def serve(bundle_path: Path, opts: ServeOptions, say: Callable[[str], None] = print) -> None:
    """Serve ``bundle_path`` until stopped. Errors found before listening, or while loading the
    model, are raised as ``DymoeError``; ``say`` gets the few lines a user should see."""
    require_serve_extra()
    check_options(opts)
    import uvicorn

    from dymoe.runtime.bundle import Bundle
    from dymoe.runtime.chat_template import bundle_chat_template
    from dymoe.runtime.model_session import open_model
    from dymoe.runtime.tokenizer import TextTokenizer

    from .app import App
    from .metrics import ServerMetrics
    from .prepare import Limits, Preparer
    from .worker import Worker

    bundle = Bundle(bundle_path)  # the manifest, strictly read: a bad bundle fails here, not in the background
    if opts.precision is not None:
        bundle.check_precision(opts.precision)
    tokenizer = TextTokenizer(bundle.tokenizer_path())
    template = bundle_chat_template(bundle, opts.chat_template)
    spec = bundle.spec
    context = spec.max_position_embeddings
    limits = Limits(context=context, vocab_size=spec.vocab_size,
                    max_prompt_tokens=min(opts.max_prompt_tokens or context - 1, context - 1),
                    max_tokens=opts.max_tokens)
    model_id = opts.model_name or Path(bundle_path).resolve().name
    sock = bind(opts.host, opts.port)
    metrics = ServerMetrics(budgeted=opts.policy is not None)
    server: uvicorn.Server | None = None

    def stop_serving(error: BaseException) -> None:  # the model failed to load
        if server is not None:
            server.should_exit = True

    worker = Worker(lambda: _load(bundle_path, opts, open_model, say), opts.queue_size, metrics,
                    on_fatal=stop_serving)
    app = App(worker, Preparer(tokenizer, template, limits, model_id), opts, model_id, metrics)
    config = uvicorn.Config(app, lifespan="on", log_level=opts.log_level, access_log=opts.access_log,
                            timeout_graceful_shutdown=opts.drain_timeout_s, limit_concurrency=opts.max_connections,
                            timeout_keep_alive=5, h11_max_incomplete_event_size=64 << 10, server_header=False,
                            http="h11")
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    if not is_loopback(opts.host) and not opts.api_key:
        say(f"warning: listening on {opts.host} without an API key: anyone who can reach this device can use it "
            "(set DYMOE_API_KEY or --api-key)")
    say(f"dymoe serve: {model_id!r} on {url}/v1 (chat template: {template.origin if template else 'none'}); "
        "loading the model, /health answers 503 until it is ready")
    stopped_by: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stopped_by.append(sig))
    try:
        # uvicorn drains on SIGTERM / Ctrl-C, then raises the signal again under the handler set
        # before it: ours for SIGTERM (so a drained server exits 0), Python's for Ctrl-C (130)
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if worker.error is not None:
        if isinstance(worker.error, DymoeError):
            raise worker.error
        raise DymoeError(f"the model failed to load: {worker.error.__class__.__name__}: {worker.error}",
                         "check the bundle with dymoe info, or rerun with DYMOE_TRACEBACK=1") from worker.error
    if stopped_by:
        cut = f"{app.cut_off} requests still running after --drain-timeout were cancelled" if app.cut_off \
            else "every request was finished first"
        say(f"dymoe serve: stopped (SIGTERM); {cut}")


def _load(bundle_path: Path, opts: ServeOptions, open_model, say: Callable[[str], None]):
    session = open_model(bundle_path, precision=opts.precision, policy=opts.policy)
    say(f"dymoe serve: ready ({session.label})")
    return session
