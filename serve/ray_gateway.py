"""What stands between Ray Serve's HTTP proxy and the replicas that hold the engines (``sdtrt.serve.ray``).

Ray's proxy answers a request whose replica dies under it with a plain-text ``500 Internal Server Error`` (its
``get_http_response_status``: a ``RayActorError`` is a 500 with no body of ours), and, once the application is
being deleted on SIGTERM, new requests with its plain-text 404 ``Path '/…' not found``. Neither is a shape an A1111
or OpenAI client reads. So the application's ingress is a small ``Gateway`` deployment with no engines: it forwards
each HTTP request whole (method, path, headers, body) over a ``DeploymentHandle`` to a ``Replica``, which runs the
FastAPI app of ``create_app`` in-process on it (``call_asgi``), and it answers itself what the proxy would get wrong:

- the replica died (or became unreachable) with the request in flight: the request is sent again once, to another
  replica (Ray's router drops a dead replica); if that fails too, a 503 in the protocol's error shape with
  ``Retry-After``. Generating again is safe: a request names its seed, or the replica that never answered drew it;
- the replicas' queues are full (Ray's back-pressure) or none is running: 503 + ``Retry-After``, same shape;
- ``drain()`` (``sdtrt serve --ray`` calls it on SIGTERM before it removes the application): new requests get 503 +
  ``Retry-After`` while those in flight finish (``/health`` still answers).

The body is read here under the same deadline and size limit as the plain server's ``BodyReader`` (which runs again
in the replica, on the whole body).
"""

from __future__ import annotations

import asyncio
import logging
import time

from sdtrt.serve.http import CLOSE, error_response

log = logging.getLogger("sdtrt.serve")

RETRY_AFTER_S = 5  # what a 503 of the gateway asks clients to wait (a replica restart takes about this long)
FORWARDED = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path",
             "headers", "client", "server")  # the parts of an ASGI scope a replica needs (all plain values)


async def call_asgi(app, scope: dict, body: bytes) -> tuple[int, list, bytes]:
    """Run one HTTP request through the ASGI ``app`` in this process: the whole ``body`` first, then a connection
    that stays open (a cancelled caller cancels the app, as a client that leaves). Returns status, raw headers and
    the whole response body."""
    status, headers, chunks = 500, [], []
    sent = False
    forever = asyncio.Event()

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await forever.wait()  # never set: the client is there until the caller is cancelled

    async def send(message):
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, headers, b"".join(chunks)


class Lifespan:
    """The ASGI lifespan of an app run by ``call_asgi`` (what uvicorn or Ray's ingress would do): startup (the engine
    thread starts) and shutdown (it stops, the engines close)."""

    def __init__(self, app):
        self.app, self.task = app, None
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.outbox: asyncio.Queue = asyncio.Queue()

    async def _step(self, kind: str) -> None:
        await self.inbox.put({"type": f"lifespan.{kind}"})
        message = await self.outbox.get()
        if message["type"] != f"lifespan.{kind}.complete":
            raise RuntimeError(f"the app's {kind} failed: {message.get('message', '')}")

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self.app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                                   self.inbox.get, self.outbox.put))
        await self._step("startup")

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            await self._step("shutdown")


async def read_body(request, max_bytes: int, timeout_s: float) -> bytes | None:
    """The request's body, at most ``max_bytes`` + 1 bytes of it (the replica's limit then refuses it by name);
    None: it did not arrive within ``timeout_s``."""
    chunks, size = [], 0

    async def read():
        nonlocal size
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                break

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        return None
    return b"".join(chunks)[:max_bytes + 1]


def unavailable(path: str, message: str):
    return error_response(path, 503, "unavailable", message, headers={"Retry-After": str(RETRY_AFTER_S)})


class GatewayLogic:
    """The gateway's behaviour, apart from Ray's deployment decorator (``sdtrt.serve.ray`` wraps it): forward, retry
    once, answer 503 in the protocol's shape, drain."""

    def __init__(self, replicas, max_bytes: int, body_timeout_s: float):
        self.replicas, self.max_bytes, self.body_timeout_s = replicas, max_bytes, body_timeout_s
        self.in_flight, self.draining = 0, False

    async def __call__(self, request):
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
        from starlette.responses import Response

        path = request.url.path
        if self.draining and path != "/health":
            return unavailable(path, "the server is shutting down; retry (another server may take it)")
        self.in_flight += 1
        try:
            body = await read_body(request, self.max_bytes, self.body_timeout_s)
            if body is None:
                return error_response(path, 408, "body_timeout", f"the request body did not arrive within "
                                      f"{self.body_timeout_s:g} s", headers=CLOSE)
            scope = {k: request.scope[k] for k in FORWARDED if k in request.scope}
            for attempt in (1, 2):
                try:
                    status, headers, content = await self.replicas.handle.remote(scope, body)
                    break
                except RayActorError as ex:  # the replica died, or cannot be reached, with the request in flight
                    log.warning("%s %s: its replica stopped (%s); %s", request.method, path, type(ex).__name__,
                                "sent again to another" if attempt == 1 else "answered 503")
                    if attempt == 2:
                        return unavailable(path, f"the replica running this request stopped, twice "
                                           f"({type(ex).__name__}); retry")
                except BackPressureError:
                    return unavailable(path, "every replica's queue is full; retry")
                except DeploymentUnavailableError:
                    return unavailable(path, "no replica is running; retry")
            response = Response(content, status_code=status)
            response.raw_headers = headers  # the replica's own (content-length of this body included)
            return response
        finally:
            self.in_flight -= 1

    async def drain(self, timeout_s: float) -> int:
        """From now on answer 503 (``/health`` excepted); wait until the requests in flight are done (at most
        ``timeout_s``). Returns how many are still in flight."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.in_flight
