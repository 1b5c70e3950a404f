"""The public HTTP listener of `endor serve`: a socket-level guard in front of Serve's proxy.

Serve runs uvicorn inside its proxy actor, and uvicorn has a keep-alive timeout but none for a
request's headers: a client that trickles header bytes (slowloris) holds its connection, and a few
hundred of them the proxy, for ever. Serve's proxy also answers its own introspection routes
(/-/routes, /-/healthz) before any app code runs, so the app's API key cannot cover them.

`ConnectionGuard` listens where the user asked (`--host`, `--port`) and Serve's proxy on a loopback
port only it uses. Per connection:

1. the request's head (request line and headers, at most MAX_HEAD_BYTES) must arrive within
   `header_timeout_s` of the connection's start, else 408 and the connection is closed (431 for a
   larger head);
2. under `protect_health` with an API key, Serve's own routes (PROXY_ROUTES) need the key (401);
3. the head goes to the proxy with `Connection: close`, then bytes are relayed both ways until the
   proxy has answered and closed. One request per connection: the next request's head would not be
   timed otherwise (the relay does not parse bodies), so a client opens a new connection per request
   (HTTP/1.1 clients do so when an answer says `Connection: close`). A stalled body is the app's
   408 (`http_front.BODY_TIMEOUT_S`); a client that leaves closes the proxy's side, which cancels
   its request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading

from endor_ray.errors import ConfigError

log = logging.getLogger("endor_ray.serve")

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; uvicorn's own h11 limit is 16 KiB per event
PROXY_ROUTES = ("/-/",)  # Serve's proxy answers these itself (/-/routes, /-/healthz)
RELAY_CHUNK_BYTES = 64 * 1024


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (for Serve's proxy behind the guard)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answer(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 answer with an OpenAI error body, closing the connection."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def _with_connection_close(head: bytes) -> bytes:
    """The request head with its Connection headers replaced by `Connection: close`."""
    lines = head.removesuffix(b"\r\n\r\n").split(b"\r\n")
    kept = [line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() != b"connection"]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


class ConnectionGuard:
    """Listens on (host, port), relays each connection to Serve's proxy at (upstream_host, upstream_port)
    once its request head arrived within header_timeout_s (module docstring)."""

    def __init__(self, host: str, port: int, upstream_port: int, header_timeout_s: float,
                 api_key: str | None = None, protect_health: bool = False, upstream_host: str = "127.0.0.1"):
        if not header_timeout_s > 0:
            raise ConfigError(f"the header timeout must be a positive number of seconds, got {header_timeout_s}")
        self.host, self.port, self.header_timeout_s = host, port, header_timeout_s
        self.upstream = (upstream_host, upstream_port)
        self.required_auth = f"Bearer {api_key}".encode() if api_key and protect_health else None
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> None:
        """Bind now (an address in use raises OSError here), then serve from a daemon thread."""
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD_BYTES))
        self._thread = threading.Thread(target=self._loop.run_forever, name="endor-connection-guard", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening and stop the thread (open relays end with the process)."""
        if self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await self._read_head(reader, writer)
            if head is not None:
                await self._relay(head, reader, writer)
        except (ConnectionError, OSError):  # the client or the proxy went away: nothing to answer
            pass
        finally:
            writer.close()

    async def _read_head(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        """The request head, or None after answering (408, 431, 401) or when the client left."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.header_timeout_s)
        except asyncio.TimeoutError:
            writer.write(_answer(408, "Request Timeout", f"the request's headers did not arrive within "
                                 f"{self.header_timeout_s:g} s", "header_timeout"))
            await writer.drain()
            return None
        except asyncio.LimitOverrunError:
            writer.write(_answer(431, "Request Header Fields Too Large", f"the request's headers exceed "
                                 f"{MAX_HEAD_BYTES} bytes", "headers_too_large"))
            await writer.drain()
            return None
        except asyncio.IncompleteReadError:
            return None
        target = head.split(b"\r\n", 1)[0].split(b" ")
        path = target[1].split(b"?", 1)[0].decode("latin-1") if len(target) > 1 else ""
        if (self.required_auth is not None and path.startswith(PROXY_ROUTES)
                and _header(head, b"authorization") != self.required_auth):
            writer.write(_answer(401, "Unauthorized", "a valid API key is required: send 'Authorization: Bearer "
                                 "<key>'", "invalid_api_key"))
            await writer.drain()
            return None
        return head

    async def _relay(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:  # Serve's proxy is not (yet, or no longer) listening
            writer.write(_answer(503, "Service Unavailable", "the server is starting or restarting; retry shortly",
                                 "proxy_unavailable"))
            await writer.drain()
            return
        try:
            upstream_writer.write(_with_connection_close(head))
            to_proxy = asyncio.ensure_future(_pipe(reader, upstream_writer))
            to_client = asyncio.ensure_future(_pipe(upstream_reader, writer))
            # Either side ending ends the relay: the proxy closes after its answer (Connection: close);
            # a client that leaves must close the proxy's side, so that Serve cancels its request.
            await asyncio.wait({to_proxy, to_client}, return_when=asyncio.FIRST_COMPLETED)
            for task in (to_proxy, to_client):
                task.cancel()
            await asyncio.gather(to_proxy, to_client, return_exceptions=True)
        finally:
            upstream_writer.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while chunk := await source.read(RELAY_CHUNK_BYTES):
        sink.write(chunk)
        await sink.drain()
