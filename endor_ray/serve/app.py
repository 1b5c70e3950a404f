"""The Ray Serve deployment: an OpenAI-compatible HTTP API over the endor-ray service.

    endor serve STORE [--host 127.0.0.1] [--port 8000] [--address ADDR]
    serve run endor_ray.serve:build_app store=stores/model        (or a config YAML, KubeRay)

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{id}], POST /tokenize,
POST /detokenize, GET /health (readiness, and how many sequences each pass served), GET /metrics
(Prometheus). With an API key every route but /health and /metrics wants `Authorization: Bearer`. The deployment starts the
shard servers and GPU workers (`endor_ray.service.driver.connect`) on the cluster it runs in; each
request goes straight to a worker, whose engine batches all requests continuously.

FastAPI reads the endpoint signatures at import time, so this module does not use
`from __future__ import annotations` (string annotations are not resolved for Serve's class views).
"""

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from endor_ray.serve import openai_api as api
from endor_ray.serve.http_front import BODY_TIMEOUT_S, app, error_response as _error, read_body as _body  # noqa: F401
from endor_ray.serve.config import APP_ARGS, ServeConfig, environment_names, serve_config_from_args  # noqa: F401
from endor_ray.serve.limits import HEADER_TIMEOUT_S, check_costs
from endor_ray.serve.responses import Shaper
from endor_ray.errors import ConfigError, EndorError

log = logging.getLogger("ray.serve")  # Serve's logger: its handlers add the replica and request context
KEEP_ALIVE_S = 10  # an idle keep-alive HTTP connection is closed after this (Serve's default keeps it 90 s)


def _merged(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' figures as one (sums and pass-weighted means)."""
    passes = sum(w["passes"] for w in workers)
    return {"passes": passes, "running": sum(w["running"] for w in workers),
            "preempted": sum(w.get("preempted", 0) for w in workers),
            "waiting": sum(w["waiting"] for w in workers),
            "mean_sequences_per_pass": (sum(w["mean_sequences_per_pass"] * w["passes"] for w in workers) / passes
                                        if passes else 0.0),
            "recent_sequences_per_pass": [rows for w in workers for rows in w["recent_sequences_per_pass"]],
            "mean_ttft_s": workers[0]["mean_ttft_s"] if len(workers) == 1 else None,
            "mean_tpot_s": workers[0]["mean_tpot_s"] if len(workers) == 1 else None}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(app)
class EndorServer:
    """HTTP front: validates requests and shapes OpenAI responses. Every request goes straight to
    a GPU worker, whose engine admits its sequences into the running batch at the next pass; a
    client that disconnects cancels them (the request's handler is cancelled, and with it the
    worker's stream)."""

    def __init__(self, config: ServeConfig):
        from endor_ray.engine.engine import load_tokenizer
        from endor_ray.engine.prompts import context_limit
        from endor_ray.serve.listeners import bind_replica_grpc_to_node
        from endor_ray.serve.metrics import ServeMetrics
        from endor_ray.service.driver import connect
        from endor_ray.store.store import Store

        bind_replica_grpc_to_node()  # before Serve starts this replica's gRPC server (after __init__)
        app.state.server = self  # for the middleware (one server per replica process)
        self.config = config
        self.api_key = config.api_key or os.environ.get("ENDOR_API_KEY") or None
        store = Store(config.store)
        self.service = connect(config.store, config.engine, config.cluster, scheduler=config.worker_scheduler)
        self.frontend = api.Frontend(config.served_name, load_tokenizer(store), context_limit(store.config),
                                     config.default_max_tokens, config.tool_call_syntax)
        self.metrics = ServeMetrics(config.served_name)
        self.started = int(time.time())

    def _authorized(self, request: Request, open_route: bool = False) -> bool:
        if self.api_key is None or (open_route and not self.config.protect_health):
            return True
        return request.headers.get("authorization") == f"Bearer {self.api_key}"

    @staticmethod
    def _unauthorized() -> JSONResponse:
        return _error(api.APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                                   code="invalid_api_key"))

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(self, request: Request):
        """200 "ok" with the batching figures while every GPU worker and shard server answers; 200
        "degraded" while some do not but a GPU worker does (requests are still served: a shard
        server's layers come from its restart or the store); 503 "unavailable" (a readiness check for
        Serve and Kubernetes) while no GPU worker answers."""
        if not self._authorized(request, open_route=True):
            return self._unauthorized()
        workers, problems = await self._component_stats()
        if not workers:
            return JSONResponse({"status": "unavailable", "model": self.config.served_name,
                                 "reason": "; ".join(problems)}, status_code=503)
        body = {"status": "degraded" if problems else "ok", "model": self.config.served_name,
                "batching": _merged(workers), "workers": workers}
        return {**body, "problems": problems} if problems else body

    async def _component_stats(self, timeout_s: float = 5.0) -> tuple[list[dict[str, Any]], list[str]]:
        """The figures of the GPU workers that answer within timeout_s, and what does not answer."""
        async def ask(ref, what: str):
            try:
                return await asyncio.wait_for(ref, timeout_s)
            except Exception as exc:  # noqa: BLE001 - dead, restarting or slow: each is reported, none raised
                return EndorError(f"{what} does not answer ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                                  if str(exc) else f"{what} does not answer ({type(exc).__name__})")

        workers = self.service.workers
        answers = await asyncio.gather(*[ask(w.stats.remote(), f"GPU worker {i}") for i, w in enumerate(workers)],
                                       *[ask(shard.ready.remote(), f"the shard server on node {node[:8]}")
                                         for node, shard in self.service.shards.items()])
        problems = [str(answer) for answer in answers if isinstance(answer, EndorError)]
        return [answer for answer in answers[:len(workers)] if not isinstance(answer, EndorError)], problems

    @app.get("/metrics")
    async def prometheus(self, request: Request):
        if not self._authorized(request, open_route=True):
            return self._unauthorized()
        workers, _ = await self._component_stats()
        batching = _merged(workers) if workers else None
        return Response(self.metrics.render(batching), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(self, request: Request):
        if not self._authorized(request):
            return self._unauthorized()
        return {"object": "list", "data": [self._model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request):
        if not self._authorized(request):
            return self._unauthorized()
        if model_id != self.config.served_name:
            return _error(api.APIError(404, f"the model {model_id!r} does not exist; this server serves "
                                            f"{self.config.served_name!r}", param="model", code="model_not_found"))
        return self._model_card()

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.config.served_name, "object": "model", "created": self.started, "owned_by": "endor-ray",
                "max_model_len": self.frontend.max_context}

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        """{"prompt"} or {"messages"} -> {"tokens", "count", "max_model_len"} (vLLM's shape)."""
        if not self._authorized(request):
            return self._unauthorized()
        try:
            body = api.parse_plain(await _body(request), ("prompt", "messages", "model", "add_special_tokens"))
            self._check_plain_model(body)
            add_special = body.get("add_special_tokens", True)
            if not isinstance(add_special, bool):
                raise api.APIError(400, "add_special_tokens must be true or false", param="add_special_tokens")
            if "messages" in body:
                chat = api.parse(json.dumps({"messages": body["messages"]}).encode(), api.ChatRequest)
                text = self.frontend.prompts(chat)[0]
            elif isinstance(body.get("prompt"), str):
                text = body["prompt"]
            else:
                raise api.APIError(400, "give a prompt (text) or messages", param="prompt")
            tokens = await asyncio.to_thread(lambda: self.frontend.tokenizer(text, add_special_tokens=add_special
                                                                             ).input_ids)
        except api.APIError as exc:
            return _error(exc)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.frontend.max_context}

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        """{"tokens": [ids]} -> {"prompt": text}."""
        if not self._authorized(request):
            return self._unauthorized()
        try:
            body = api.parse_plain(await _body(request), ("tokens", "model"))
            self._check_plain_model(body)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or any(type(t) is not int or not 0 <= t < self.frontend.vocab_size
                                                   for t in tokens):
                raise api.APIError(400, f"tokens must be a list of token ids in [0, {self.frontend.vocab_size})",
                                   param="tokens")
        except api.APIError as exc:
            return _error(exc)
        return {"prompt": self.frontend.tokenizer.decode(tokens)}

    def _check_plain_model(self, body: dict[str, Any]) -> None:
        """/tokenize and /detokenize: a `model` other than the served one is a 404, as elsewhere."""
        model = body.get("model")
        if model is not None and model != self.config.served_name:
            raise api.APIError(404, f"the model {model!r} does not exist; this server serves "
                                    f"{self.config.served_name!r}", param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, api.CompletionRequest, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, api.ChatRequest, "/v1/chat/completions")

    async def _handle(self, request: Request, kind: type, route: str):
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id") or api.new_id("chatcmpl" if kind is api.ChatRequest else "cmpl")
        if not self._authorized(request):
            return self._log(request_id, route, self._unauthorized(), started)
        try:
            length = int(request.headers.get("content-length") or 0)
            if length > api.MAX_BODY_BYTES:  # before reading it
                raise api.APIError(413, f"the request body has {length} bytes; this server takes at most "
                                        f"{api.MAX_BODY_BYTES}")
            parsed = api.parse(await _body(request), kind)
            check_costs(parsed)  # caps on what one request may cost, before any tokenizing
            # Templates and tokenizers take time on long prompts: off the event loop (/health stays quick)
            choices = await asyncio.to_thread(self.frontend.requests, parsed)
        except api.APIError as exc:
            return self._log(request_id, route, _error(exc), started)
        shaper = Shaper(self.frontend, parsed, request_id, choices)
        # The token ids the replica checked: the worker tokenizes nothing again
        events = self.service.astream([c.prompt_ids for c in choices], [c.params for c in choices])
        if parsed.stream:
            try:
                first = await anext(events)  # a refused request is an HTTP error, not a broken stream
            except StopAsyncIteration:
                first = None
            except EndorError as exc:
                return self._log(request_id, route, _error(api.api_error(exc)), started)
            self._log(request_id, route, None, started, status=200, prompt_tokens=shaper.prompt_tokens)
            return StreamingResponse(shaper.stream(first, self._recorded(events, shaper.prompt_tokens)),
                                     media_type="text/event-stream",
                                     headers={"x-request-id": request_id})
        try:
            async for event in events:
                if "completions" in event:
                    result = event
                    break
            else:
                raise EndorError("the request ended without a result")
        except EndorError as exc:
            return self._log(request_id, route, _error(api.api_error(exc)), started)
        failed = [c for c in result["completions"] if c["finish_reason"] == "error"]
        if failed:  # this request's own failure (its sampling), never its neighbours'
            return self._log(request_id, route, _error(api.APIError(500, f"generation failed: {failed[0]['error']}")),
                             started)
        response = JSONResponse(shaper.response(result["completions"]), headers={"x-request-id": request_id})
        return self._log(request_id, route, response, started, stats=result["stats"],
                         prompt_tokens=shaper.prompt_tokens)

    async def _recorded(self, events, prompt_tokens: int):
        """A stream's events, its result's figures recorded in the metrics as it passes."""
        try:
            async for event in events:
                if "stats" in event:
                    self.metrics.generated(event["stats"], prompt_tokens)
                yield event
        finally:
            await events.aclose()

    def _log(self, request_id: str, route: str, response, started: float, status: int | None = None,
             stats: dict | None = None, prompt_tokens: int = 0):
        """One line per request: id, route, status, tokens, latency (prompts only with --log-prompts);
        a whole response's figures to the metrics (the middleware counts every request)."""
        status = status if status is not None else response.status_code
        if stats is not None:
            self.metrics.generated(stats, prompt_tokens)
        generated = stats["new_tokens"] if stats else 0
        log.info("request %s %s %d prompt_tokens=%d generated=%d %.3fs", request_id, route, status, prompt_tokens,
                 generated, time.perf_counter() - started)
        return response


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for `serve run endor_ray.serve:build_app store=...` or a config YAML.

    The store is opened here, before anything is deployed, so a wrong path fails at once. Under
    the `serve` command a user's mistake is one line on stderr and exit status 1 (not a traceback
    from deep inside Serve); elsewhere it raises.
    """
    from endor_ray.store import Store

    try:
        config = serve_config_from_args(args)
        Store(config.store)
    except EndorError as exc:
        if Path(sys.argv[0]).name == "serve":
            print(f"serve: endor_ray.serve: error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        raise
    return EndorServer.bind(config)


def app_from_environment() -> serve.Application:
    """`endor_ray.serve:application`, the Application `serve build` wants: the arguments of `build_app`
    from ENDOR_<ARG> environment variables (ENDOR_STORE=s3://... ENDOR_SCHEDULER_MAX_NUM_SEQS=16 ...)."""
    args = {name: os.environ[variable] for variable, name in environment_names().items() if variable in os.environ}
    if "store" not in args:
        message = "set ENDOR_STORE (and any other ENDOR_<ARG>) for endor_ray.serve:application, or use build_app with args"
        if Path(sys.argv[0]).name == "serve":
            print(f"serve: endor_ray.serve: error: {message}", file=sys.stderr)
            raise SystemExit(1)
        raise ConfigError(message)
    return build_app(args)


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
               allow_unauthenticated_cluster: bool = False, header_timeout_s: float | None = None) -> None:
    """Start Serve on the cluster (a local Ray unless config.cluster.address is set) and block until Ctrl-C.
    A cluster whose nodes listen beyond loopback with Ray's auth off is refused unless allowed
    (`endor_ray.serve.listeners`). Clients reach Serve's proxy (on a loopback port) through a
    `ConnectionGuard` on host:port: a request's headers must arrive within header_timeout_s (default:
    limits.HEADER_TIMEOUT_S; else 408), one request per connection, Serve's /-/ routes behind the key
    under protect_health."""
    import ray

    from endor_ray.serve.connection_guard import ConnectionGuard, free_loopback_port
    from endor_ray.serve.listeners import check_cluster_exposure
    from endor_ray.service.ray_session import init_ray

    def stop(signum, frame):  # SIGTERM (kill, Kubernetes) is the normal way to stop: shut down, exit 0
        raise SystemExit(0)

    proxy_port = free_loopback_port()
    header_timeout_s = HEADER_TIMEOUT_S if header_timeout_s is None else header_timeout_s
    guard = ConnectionGuard(host, port, proxy_port, header_timeout_s, protect_health=config.protect_health,
                            api_key=config.api_key or os.environ.get("ENDOR_API_KEY") or None)
    started_ray = init_ray(config.cluster.address)
    try:
        check_cluster_exposure(allow_unauthenticated_cluster)
        serve.start(http_options={"host": "127.0.0.1", "port": proxy_port, "keep_alive_timeout_s": KEEP_ALIVE_S})
        serve.run(build_app(dataclasses.asdict(config)),
                  name="endor", route_prefix="/", blocking=False)
        guard.start()  # once Serve answers: a client that connects earlier would get 503s
        signal.signal(signal.SIGTERM, stop)  # after Ray's start, which installs its own handler
        print(f"serving {config.served_name!r} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    finally:
        guard.close()
        serve.shutdown()
        if started_ray:
            ray.shutdown()
