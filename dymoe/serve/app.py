"""The ASGI application: routes, the API key, body limits, and the bridge between a request and
its job on the worker thread (server-sent events for ``stream: true``, one JSON object
otherwise). Every error leaves in OpenAI's error shape; a client that disconnects, at any point,
has its job withdrawn or cancelled before its next token."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time

from dymoe.bundle.errors import DymoeError
from dymoe.runtime.memory import current_rss

from . import metrics as prom
from .errors import ApiError, bad_request
from .options import ServeOptions
from .prepare import GenRequest, Preparer
from .protocol import CHAT, COMPLETION, Responder, Usage
from .worker import LOADING, READY, Delta, Done, Failed, Job, Worker

log = logging.getLogger("dymoe.serve")

MODELS = "/v1/models"
ROUTES = {"/health": ("GET",), "/metrics": ("GET",), MODELS: ("GET",), "/v1/completions": ("POST",),
          "/v1/chat/completions": ("POST",)}
CLOSE = (("connection", "close"),)  # after an unread body, the connection cannot carry another request
GONE = object()  # posted to a request's events when its client disconnects


class ClientGone(Exception):
    """The client disconnected before its response could be sent."""


class Reply:
    """One HTTP response, sent through ASGI; remembers its status for the metrics."""

    def __init__(self, send) -> None:
        self._send = send
        self.status: int | None = None
        self.events = False  # a server-sent event stream
        self.done = False

    async def start(self, status: int, content_type: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.status = status
        self.events = content_type.startswith("text/event-stream")
        raw = [(b"content-type", content_type.encode())] + [(k.encode(), v.encode()) for k, v in headers]
        await self._send({"type": "http.response.start", "status": status, "headers": raw})

    async def body(self, data: bytes, more: bool = False) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})
        self.done = not more

    async def json(self, status: int, obj: dict, headers: tuple[tuple[str, str], ...] = ()) -> None:
        data = json.dumps(obj).encode()
        await self.start(status, "application/json", (("content-length", str(len(data))), *headers))
        await self.body(data)

    async def error(self, e: ApiError) -> None:
        if self.status is None:  # once a stream has begun, errors travel inside it
            await self.json(e.status, e.payload(), e.headers)

    async def event(self, obj: dict | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        await self.body(f"data: {data}\n\n".encode(), more=data != "[DONE]")

    async def close_with(self, e: ApiError) -> None:
        """End the response with ``e``, however far it got (for a request cut off at shutdown)."""
        if self.status is None:
            await self.error(e)
        elif self.events and not self.done:
            await self.event({"error": e.payload()["error"]})
            await self.event("[DONE]")
        elif not self.done:
            await self.body(b"")


class App:
    def __init__(self, worker: Worker, preparer: Preparer, opts: ServeOptions, model_id: str,
                 metrics: prom.ServerMetrics) -> None:
        self.worker = worker
        self.prepare = preparer
        self.opts = opts
        self.model_id = model_id
        self.metrics = metrics
        self.created = int(time.time())
        self.cut_off = 0  # requests cancelled because the drain timeout ran out at shutdown

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.worker.start()  # loads the model on its own thread: /health says 503 meanwhile
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.to_thread(self.worker.stop)  # connections have drained by now
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send) -> None:
        path, method = scope["path"], scope["method"]
        endpoint = path if path in ROUTES else f"{MODELS}/{{id}}" if path.startswith(MODELS + "/") else "other"
        reply = Reply(send)
        try:
            self._authorize(scope)
            allowed = ROUTES.get(endpoint, ("GET",) if endpoint != "other" else ())
            if not allowed:
                raise ApiError(404, f"no such endpoint: {method} {path}", "not_found")
            if method not in allowed:
                raise ApiError(405, f"{path} answers {', '.join(allowed)}, not {method}", "method_not_allowed",
                               headers=(("allow", ", ".join(allowed)),))
            if method == "GET":
                await self._get(endpoint, path, reply)
            else:
                await self._generate(COMPLETION if path == "/v1/completions" else CHAT, scope, receive, reply)
        except ApiError as e:
            await reply.error(e)
        except ClientGone:
            pass
        except asyncio.CancelledError:  # uvicorn's drain timeout ran out: the job was withdrawn in _generate
            self.cut_off += 1
            await reply.close_with(ApiError(503, "the server shut down before this request finished",
                                            "server_shutting_down"))
        except Exception:  # a bug: the client gets a 500 in the usual shape, the log the traceback
            log.exception("unexpected error answering %s %s", method, path)
            await reply.error(ApiError(500, "internal server error (see the server's log)", "internal_error"))
        finally:
            self.metrics.request(endpoint, reply.status or 499)  # 499: the client closed first (nginx's code)

    def _authorize(self, scope) -> None:
        key = self.opts.api_key
        if not key:
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or incorrect API key; send the header 'Authorization: Bearer <key>'",
                           "invalid_api_key", headers=(("www-authenticate", "Bearer"),))

    # --- GET ----------------------------------------------------------------------------------

    async def _get(self, endpoint: str, path: str, reply: Reply) -> None:
        if endpoint == "/health":
            state = self.worker.state
            if state == READY:
                await reply.json(200, {"status": "ok", "model": self.model_id})
                return
            message = "the model is loading" if state == LOADING else f"the server is {state}"
            await reply.json(503, {"status": state, **ApiError(503, message, "model_not_ready").payload()},
                             (("retry-after", "1"),))
        elif endpoint == "/metrics":
            w = self.worker
            self.metrics.state(w.queue_depth(), w.queue_size, 1 if w.running else 0, w.state == READY)
            self.metrics.session_totals({**w.totals, "rss_bytes": current_rss()})
            await reply.start(200, prom.CONTENT_TYPE)
            await reply.body(self.metrics.render().encode())
        elif endpoint == MODELS:
            await reply.json(200, {"object": "list", "data": [self._model()]})
        else:
            wanted = path[len(MODELS) + 1:]
            if wanted != self.model_id:
                raise ApiError(404, f"the model {wanted!r} does not exist; this server serves {self.model_id!r}",
                               "model_not_found", "model")
            await reply.json(200, self._model())

    def _model(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "dymoe"}

    # --- POST: generation ---------------------------------------------------------------------

    async def _generate(self, kind: str, scope, receive, reply: Reply) -> None:
        body = _parse_json(await self._read_body(scope, receive))
        try:
            request = await asyncio.to_thread(self.prepare, kind, body)  # template + tokenizer: not on the loop
        except DymoeError as e:
            raise bad_request(e.message) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: object) -> None:  # called on the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop has closed (forced shutdown): nobody is listening
                job.cancel.set()

        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        job = Job(request, emit, seed)
        self.worker.submit(job)  # 429 / 503 at once, before any response has started
        watcher = asyncio.create_task(self._watch(receive, job, events))
        try:
            if request.params.stream:
                await self._stream(request, events, reply)
            else:
                await self._collect(request, events, reply)
        finally:
            watcher.cancel()
            if not job.finished:  # disconnected, cancelled by a forced shutdown, or a failed send
                self.worker.withdraw(job)

    async def _watch(self, receive, job: Job, events: asyncio.Queue) -> None:
        """The body has been read, so the next message is the disconnect (or the end of the response)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.worker.withdraw(job)
        events.put_nowait(GONE)

    async def _collect(self, request: GenRequest, events: asyncio.Queue, reply: Reply) -> None:
        responder, pieces = Responder(request.kind, self.model_id), []
        while True:
            event = await events.get()
            if event is GONE:
                raise ClientGone
            if isinstance(event, Delta):
                pieces.append(event.text)
            elif isinstance(event, Failed):
                raise event.error
            elif isinstance(event, Done):
                usage = Usage(event.prompt_tokens, event.completion_tokens)
                await reply.json(200, responder.full("".join(pieces), event.finish_reason, usage))
                return

    async def _stream(self, request: GenRequest, events: asyncio.Queue, reply: Reply) -> None:
        responder = Responder(request.kind, self.model_id)
        usage_on = request.params.include_usage
        await reply.start(200, "text/event-stream; charset=utf-8",
                          (("cache-control", "no-cache"), ("x-accel-buffering", "no")))
        if request.kind == CHAT:  # OpenAI's first chunk names the role
            await reply.event(responder.chunk("", first=True, include_usage=usage_on))
        while True:
            event = await events.get()
            if event is GONE:
                raise ClientGone
            if isinstance(event, Delta):
                await reply.event(responder.chunk(event.text, include_usage=usage_on))
            elif isinstance(event, Failed):  # the openai client raises APIError on an "error" event
                await reply.event({"error": event.error.payload()["error"]})
                await reply.event("[DONE]")
                return
            elif isinstance(event, Done):
                await reply.event(responder.chunk(None, event.finish_reason, include_usage=usage_on))
                if usage_on:
                    await reply.event(responder.usage_chunk(Usage(event.prompt_tokens, event.completion_tokens)))
                await reply.event("[DONE]")
                return

    async def _read_body(self, scope, receive) -> bytes:
        limit = self.opts.max_body_bytes
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise ApiError(413, f"the request body is larger than this server accepts ({limit} bytes)",
                           "body_too_large", headers=CLOSE)
        try:
            return await asyncio.wait_for(_receive_body(receive, limit), self.opts.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.opts.body_timeout_s:g} s",
                           "request_timeout", headers=CLOSE) from None


async def _receive_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:  # a chunked body declares no length
            raise ApiError(413, f"the request body is larger than this server accepts ({limit} bytes)",
                           "body_too_large", headers=CLOSE)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise bad_request("the request body is not valid JSON (nested too deeply)") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body
