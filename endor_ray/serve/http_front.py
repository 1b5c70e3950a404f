"""The HTTP plumbing under the Serve app's routes: the FastAPI app, its error bodies, and a middleware.

Every answer that is not a route's own is an OpenAI error body: unknown routes (404), methods
(405), and anything a route did not turn into an answer (500, the traceback to the log). The
middleware counts every request by route and status for /metrics (streams and 5xx included) and
keeps FastAPI's docs routes behind the API key under --protect-health. It finds the deployment
(`endor_ray.serve.app.EndorServer`, one per replica process) as `app.state.server`.
"""

import asyncio
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from endor_ray.serve import openai_api as api

log = logging.getLogger("ray.serve")
BODY_TIMEOUT_S = 30  # a request body that takes longer to arrive is a 408 (a stalled client frees its slot)

app = FastAPI(title="endor-ray", description="OpenAI-compatible API for offloaded inference")


DOCS_ROUTES = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")  # FastAPI's own


def error_response(exc: api.APIError) -> Response:
    # json.dumps escapes what UTF-8 cannot carry (a lone surrogate a client sent, echoed in a message)
    return Response(json.dumps(exc.body()), status_code=exc.status, media_type="application/json")


async def read_body(request: Request) -> bytes:
    """The request body, or a 408 if the client stalls sending it for BODY_TIMEOUT_S."""
    try:
        return await asyncio.wait_for(request.body(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise api.APIError(408, f"the request body did not arrive within {BODY_TIMEOUT_S} s") from None


class _CountedAndGuarded:
    """ASGI middleware: counts every HTTP request by route and status (streams and 5xx included:
    the status is the one sent, 500 if none was), and under --protect-health keeps FastAPI's docs
    routes behind the key. Pure ASGI, so a client's disconnect still cancels its handler."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        server = getattr(scope.get("app", app).state, "server", None) if scope["type"] == "http" else None
        if server is None:
            return await self.inner(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path") or "") or "/"
        if path in DOCS_ROUTES and not server._authorized(Request(scope), open_route=True):
            server.metrics.count(path, 401)
            return await server._unauthorized()(scope, receive, send)
        sent = {}

        async def sending(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            await send(message)

        try:
            await self.inner(scope, receive, sending)
        finally:
            route = scope.get("route")  # the route template that matched (FastAPI sets it), not the raw path
            server.metrics.count(getattr(route, "path", "unmatched"), sent.get("status", 500))


app.add_middleware(_CountedAndGuarded)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    """What no route turned into an answer: a 500 with an OpenAI body (the traceback goes to the log)."""
    log.error("unhandled error on %s %s: %r", request.method, request.url.path, exc, exc_info=exc)
    return error_response(api.APIError(500, f"internal error ({type(exc).__name__}); the server's log has the details"))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """Unknown routes and methods answer with an OpenAI-style body too."""
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(api.APIError(exc.status_code, message.get(exc.status_code, str(exc.detail))))
