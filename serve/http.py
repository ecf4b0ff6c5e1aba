"""The HTTP edge of ``sdtrt serve``, between the socket and the FastAPI app of ``sdtrt.serve.app``:

- ``error_response``: each protocol's own error shape — AUTOMATIC1111's routes ``{"error", "detail"}``, OpenAI's
  ``/v1/*`` ``{"error": {"message", "type", "param", "code"}}`` (and 400 where FastAPI would say 422);
- ``Guard``: credentials and the declared body size, before anything is read;
- ``BodyReader``: the whole body read under one deadline (a client sending 1 byte/s, or fewer bytes than its
  Content-Length, gets a 408 and the connection closes), its real size limited (chunked bodies declare none), a JSON
  route's body checked to be UTF-8 JSON and a form route's to be a form (a 4xx naming the problem), a client that
  goes away logged in one line;
- ``bind`` and ``run_uvicorn``: the socket bound before uvicorn runs (a taken port is the CLI's one-line error), the
  startup line once it listens, uvicorn's access log, and SIGTERM/SIGINT drain requests in flight, then return.

Plain ASGI middlewares: Starlette's BaseHTTPMiddleware would hide a client's disconnect from the handlers (and queued
work of clients that left would still run).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import sys
import time

from sdtrt.errors import UsageError

log = logging.getLogger("sdtrt.serve")

OPENAI_CODES = {"unauthorized": "invalid_api_key", "unknown_url": None}  # OpenAI's own code where it has one for the same problem


class ClientGone(Exception):
    """The client closed its connection before its answer (raised by the handler that noticed; logged in one line)."""


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(path: str, status: int, kind: str, message: str, param: str | None = None) -> tuple[int, dict]:
    """The status and JSON body of an error on ``path``, in its protocol's shape."""
    if is_openai(path):
        return (400 if status == 422 else status), {"error": {
            "message": message, "type": "invalid_request_error" if status < 500 else "server_error", "param": param,
            "code": OPENAI_CODES.get(kind, kind)}}
    return status, {"error": kind, "detail": message}


def error_response(path: str, status: int, kind: str, message: str, *, param: str | None = None,
                   headers: dict | None = None):
    from fastapi.responses import JSONResponse

    status, body = error_body(path, status, kind, message, param)
    return JSONResponse(body, status_code=status, headers=headers)


CLOSE = {"connection": "close"}  # after an answer sent before the body was read: the rest of it is not read


def check_credentials(api_key: str | None, api_auth: str | None) -> None:
    """Credentials a client can send: an HTTP header carries visible ASCII, and one with spaces at its ends (or
    blank) could never match what arrives (servers strip them)."""
    if api_key is not None:
        bad = next((c for c in api_key if not 0x21 <= ord(c) <= 0x7e), None)
        if not api_key.strip() or bad is not None:
            what = "is blank" if not api_key.strip() else f"contains {bad!r}"
            raise UsageError(f"--api-key {what}: clients send it in a header, so it takes visible ASCII characters "
                             "without spaces")
    for pair in api_auth.split(",") if api_auth is not None else ():
        user, sep, password = pair.partition(":")
        if not (sep and user.strip() and password.strip()) or pair != pair.strip() or \
                any(ord(c) < 0x20 or ord(c) == 0x7f for c in pair):
            raise UsageError(f"--api-auth takes USER:PASS[,USER:PASS...] (neither blank, no spaces around them, no "
                             f"control characters), got {pair!r}")


def _with_header(send, name: bytes, value: bytes):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return wrapped


class Guard:
    """API key / HTTP Basic credentials (``accepted``: the Authorization header values that let a request in,
    compared in constant time; none: no check) everywhere but /health, and the body size a request declares;
    ``replica``: sent back as ``X-Sdtrt-Replica``. A 401 carries ``challenge`` as its ``WWW-Authenticate`` header
    (RFC 9110: a 401 must; a browser asks for HTTP Basic credentials on ``Basic realm=...``)."""

    def __init__(self, app, accepted: set[str], hint: str, max_bytes: int, replica: str | None = None,
                 count=lambda kind: None, challenge: str = 'Bearer realm="sdtrt"'):
        self.app, self.hint, self.max_bytes, self.replica, self.count = app, hint, max_bytes, replica, count
        self.challenge = challenge
        self.accepted = [a.encode() for a in accepted]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers", []))
            problem = None
            if self.accepted and scope["path"] != "/health" and \
                    not any(hmac.compare_digest(headers.get(b"authorization", b""), a) for a in self.accepted):
                problem = 401, "unauthorized", self.hint, {"WWW-Authenticate": self.challenge}
            length = headers.get(b"content-length", b"")
            if problem is None and length.isdigit() and int(length) > self.max_bytes:
                problem = 413, "too_large", f"the body is over this server's limit of {_mb(self.max_bytes)}", CLOSE
            if self.replica is not None:
                send = _with_header(send, b"x-sdtrt-replica", self.replica.encode())
            if problem is not None:
                status, kind, message, headers = problem
                self.count(kind)
                await error_response(scope["path"], status, kind, message, headers=headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _mb(n: int) -> str:
    return f"{n / 2**20:g} MB"


def body_problem(body: bytes, content_type: bytes | None) -> str | None:
    """What makes ``body`` unusable as a JSON request (None: nothing). JSON on the wire is UTF-8 (RFC 8259; a BOM is
    tolerated, as Python's json does); FastAPI would otherwise guess UTF-16/32 or answer a generic 400."""
    if content_type:
        media = content_type.split(b";")[0].strip().lower().decode("latin-1")
        if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
            return f"the body is {media or 'untyped'}, not JSON: send it with Content-Type: application/json"
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as ex:
        bom = next((name for name, mark in (("UTF-32", b"\xff\xfe\x00\x00"), ("UTF-32", b"\x00\x00\xfe\xff"),
                                            ("UTF-16", b"\xff\xfe"), ("UTF-16", b"\xfe\xff"))
                    if body.startswith(mark)), None)
        if bom:
            return f"body is not UTF-8: it starts with a {bom} byte order mark (JSON must be UTF-8)"
        return f"body is not UTF-8: byte 0x{body[ex.start]:02x} at offset {ex.start} (JSON must be UTF-8)"
    try:
        json.loads(text)
    except json.JSONDecodeError as ex:
        return f"body is not valid JSON: {ex.msg} at line {ex.lineno} column {ex.colno}"
    except RecursionError:
        return "body is not usable JSON: nested too deeply"
    return None


def form_problem(content_type: bytes | None) -> str | None:
    """What makes a body unusable for a form route (OpenAI's image edits take multipart/form-data); None: nothing."""
    media = (content_type or b"").split(b";")[0].strip().lower().decode("latin-1")
    if media in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return None
    return f"the body is {media or 'untyped'}, not multipart/form-data: send the image (and mask) as file parts"


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "a client"


class BodyReader:
    """Reads each request's body before the app sees it, all of it within ``timeout_s`` of the request's start and
    at most ``max_bytes``; checks the body of a POST to one of ``json_paths`` (see ``body_problem``); then hands the
    app the body and, after it, the connection's own messages (a disconnect). A client that goes away — while sending
    its body, or while its request waits or runs (``ClientGone``) — is one warning line. ``count(kind)``: each
    refusal, for the metrics."""

    def __init__(self, app, timeout_s: float, max_bytes: int, json_paths: frozenset[str], count=lambda kind: None,
                 form_paths: frozenset[str] = frozenset()):
        self.app, self.timeout_s, self.max_bytes, self.json_paths = app, timeout_s, max_bytes, json_paths
        self.count, self.form_paths = count, form_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, start = scope["path"], time.monotonic()
        what = f"{scope['method']} {path}"
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length", b"").decode("latin-1") or "an undeclared number of"
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(start + self.timeout_s - time.monotonic(), 0))
            except asyncio.TimeoutError:
                self.count("body_timeout")
                await error_response(path, 408, "body_timeout", f"the request body did not arrive within "
                                     f"{self.timeout_s:g} s ({size} of {declared} bytes came)",
                                     headers=CLOSE)(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                log.warning("client %s went away while sending %s (%d of %s body bytes)", _client(scope), what, size,
                            declared)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                self.count("too_large")
                await error_response(path, 413, "too_large", f"the body is over this server's limit of "
                                     f"{_mb(self.max_bytes)}", headers=CLOSE)(scope, receive, send)
                return
        body = b"".join(chunks)
        if scope["method"] == "POST" and (path in self.json_paths and body or path in self.form_paths):
            problem = body_problem(body, headers.get(b"content-type")) if path in self.json_paths else \
                form_problem(headers.get(b"content-type"))
            if problem is not None:
                self.count("invalid_body")
                await error_response(path, 422, "invalid_body", problem)(scope, receive, send)
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracked)
        except ClientGone:
            log.warning("client %s went away before its answer to %s (after %.1f s; its queued work is dropped)",
                        _client(scope), what, time.monotonic() - start)
        except asyncio.CancelledError:  # uvicorn cancels what still runs when a graceful stop runs out of time
            log.warning("%s from %s was cut off: the server stopped before it was done", what, _client(scope))
            if not started:
                await error_response(path, 503, "stopping", "the server stopped before this request was done",
                                     headers=CLOSE)(scope, receive, send)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port), or a UsageError naming why not. IPv6 only for an IPv6
    address (uvicorn's rule): ``localhost`` is 127.0.0.1 even where /etc/hosts lists ::1 first, as clients expect."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as ex:
        raise UsageError(f"cannot listen on {host}: {getattr(ex, 'strerror', None) or ex}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as ex:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {ex.strerror or ex} (another server there? pass "
                         "--port)") from None
    return sock


def url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_uvicorn(app, sock: socket.socket, on_listening, *, access_log: bool = True, log_level: str = "warning",
                drain_s: float = 120.0, say=None) -> None:
    """Serve ``app`` on ``sock`` with uvicorn until SIGTERM/SIGINT; then stop taking connections, let requests in
    flight finish (up to ``drain_s``; then they are answered 503) and return. A second signal stops at once.
    ``on_listening()`` runs once the socket listens; uvicorn's access log (on stdout) is its own, its other messages
    from ``log_level`` up."""
    import copy
    import os
    import signal
    import threading

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    logging_config = copy.deepcopy(LOGGING_CONFIG)
    for name in ("uvicorn", "uvicorn.error"):
        logging_config["loggers"][name]["level"] = log_level.upper()
    logging_config["loggers"]["uvicorn.access"]["level"] = "INFO"
    logging.getLogger("sdtrt.serve").setLevel(log_level.upper() if log_level != "trace" else "DEBUG")

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and not self.should_exit:
                on_listening()

        def capture_signals(self):
            """uvicorn's, but a signal is not raised again once the server has stopped: a stop asked for is not
            an error (the CLI would exit 143)."""
            import contextlib

            @contextlib.contextmanager
            def capture():
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                signals = (signal.SIGINT, signal.SIGTERM)
                previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

            return capture()

        def handle_exit(self, sig, frame):
            name = signal.Signals(sig).name
            if self.should_exit:
                say(f"sdtrt serve: {name} again: stopping now")
                sys.stdout.flush()
                os._exit(128 + sig)  # what runs is cut off: nothing to wait for, nothing to clean up in time
            self.should_exit = True
            busy = sum(1 for c in self.server_state.connections if getattr(c, "cycle", None) is not None
                       and not c.cycle.response_complete)
            say(f"sdtrt serve: {name}: stopping; {busy} request(s) in flight finish first (again: stop now)")

    config = uvicorn.Config(app, log_config=logging_config, access_log=access_log, timeout_graceful_shutdown=drain_s,
                            lifespan="on")
    Server(config).run(sockets=[sock])
