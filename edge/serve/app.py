"""The HTTP API (FastAPI): OpenAI's completions and chat completions, models,
health and Prometheus metrics. Requests become Jobs for the engine; the
engine's events become one JSON response or a stream of server-sent events.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from edge.serve import protocol as P
from edge.serve.engine import CompletionResult, Engine, Job, tandem_summary
from edge.serve.metrics import Metrics
from edge.serve.protocol import RequestError

log = logging.getLogger("tandem.serve")
MAX_BODY_BYTES = 4 << 20       # a full context of text is ~10 KB: anything near this is a mistake or abuse


@dataclass
class ServeInfo:
    """What the routes need to know about the daemon around them."""
    mode: str                          # configured generation mode
    verifier: str | None               # verifier address (None: edge-only daemon)
    can_serve_alone: bool              # a drafter is loaded: edge-only fallback possible
    model_ids: Callable[[], list[str]]
    target: Callable[[], dict]         # what is known of the verifier's target
    probe: Callable[[], Awaitable[bool]]   # is the verifier reachable now?


def error_response(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def cloud_error(e: Exception) -> RequestError:
    """A generation failure as an HTTP error the client can act on."""
    from edge.client import CloudError
    if isinstance(e, CloudError):
        name = e.code.name if e.code is not None else "UNKNOWN"
        if name in ("INVALID_ARGUMENT", "OUT_OF_RANGE"):
            return RequestError(f"the verifier refused the request: {e}", status=400, code=name.lower())
        if name in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
            return RequestError(f"the verifier is unavailable: {e}", status=503, code=name.lower(),
                                headers={"Retry-After": "2"})
        return RequestError(f"verifier error: {e}", status=502, code=name.lower())
    log.exception("generation failed")
    return RequestError(f"generation failed: {type(e).__name__}: {e}", status=500, code="internal_error")


def build_app(engine: Engine, metrics: Metrics, info: ServeInfo) -> FastAPI:
    app = FastAPI(title="tandem edge-agent", description="OpenAI-compatible API of the tandem edge daemon",
                  docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, e: RequestError):
        return error_response(e)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(RequestError(f"internal error: {type(e).__name__}: {e}", status=500).body(),
                            status_code=500)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.get("/v1/models")
    async def models():
        target = info.target()
        return {"object": "list", "data": [
            {"id": mid, "object": "model", "created": 0, "owned_by": "tandem", "tandem": target}
            for mid in info.model_ids()]}

    @app.get("/healthz")
    async def healthz():
        reachable = await info.probe() if info.verifier else False
        metrics.reachable(reachable)
        if info.mode == "edge-only":
            serving = "edge-only"
        elif reachable:
            serving = info.mode
        else:
            serving = "edge-only" if info.can_serve_alone else "unavailable"
        live = metrics.snapshot()
        body = {"status": "ok" if serving != "unavailable" else "unavailable", "mode": info.mode,
                "serving": serving, "verifier": {"address": info.verifier, "reachable": reachable,
                                                 **info.target()},
                "queue": {"waiting": live.waiting, "running": live.running, "capacity": metrics.queue_capacity}}
        return JSONResponse(body, status_code=200 if serving != "unavailable" else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def generate(request: Request, kind: str):
        endpoint = "chat" if kind == "chat" else "completions"
        t0 = time.monotonic()
        try:
            if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
                raise RequestError(f"request body over {MAX_BODY_BYTES >> 20} MB", status=413, code="too_large")
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise RequestError(f"request body over {MAX_BODY_BYTES >> 20} MB", status=413, code="too_large")
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise RequestError(f"the request body is not valid JSON: {e}") from None
            req = P.parse_request(body, kind, engine.cfg.max_n)
            ids = info.model_ids()
            if req.model not in ids:
                raise RequestError(f"model {req.model!r} is not served here; available: {', '.join(ids)}", "model",
                                   status=404, code="model_not_found")
            prompt = engine.prompt_tokens(req)
            configs = engine.configs(req, len(prompt))
            engine.admit()
        except RequestError as e:
            metrics.requests.labels(endpoint, str(e.status)).inc()
            return error_response(e)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        def emit(ev: tuple) -> None:     # from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:          # the loop is gone (shutdown): nobody is listening any more
                job.cancelled.set()
        job = Job(req, prompt, configs, emit=emit)
        try:
            engine.submit(job)
        except BaseException:
            engine.release(job)
            raise
        rid, created = P.new_id(kind), P.now()
        model = req.model

        def finished(status: int) -> None:
            job.cancelled.set()          # a generation still running for a gone client stops at its next token
            engine.release(job)
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.request_seconds.labels(endpoint).observe(time.monotonic() - t0)

        if req.stream:
            return StreamingResponse(stream(job, events, rid, created, model, len(prompt), finished),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        status = 200
        try:
            results, error = await collect(request, job, events)
            if error is not None:
                status = error.status
                return error_response(error)
            if results is None:
                status = 499              # the client went away: nobody reads this
                return Response(status_code=499)
            ordered = [results[i] for i in sorted(results)]
            choices = [P.choice(kind, r.index, r.text, r.finish_reason, r.tokens if req.return_token_ids else None)
                       for r in ordered]
            use = P.usage(len(prompt), sum(len(r.tokens) for r in ordered))
            tandem = tandem_summary(ordered, engine.base.mode, job.queue_s)
            return JSONResponse(P.response(kind, rid, model, created, choices, use, tandem))
        finally:
            finished(status)

    async def collect(request: Request, job: Job, events: asyncio.Queue):
        """(results by index, None) | (None, error) | (None, None) when the client left."""
        async def gather():
            results: dict[int, CompletionResult] = {}
            while True:
                ev = await events.get()
                if ev[0] == "done":
                    results[ev[1]] = ev[2]
                elif ev[0] == "error":
                    return None, cloud_error(ev[1])
                elif ev[0] == "end":
                    return results, None

        async def client_left():
            # The body has been read: the next ASGI message is the disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass
        work, gone = asyncio.create_task(gather()), asyncio.create_task(client_left())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if work.done():
            return work.result()
        work.cancel()
        return None, None

    async def stream(job: Job, events: asyncio.Queue, rid: str, created: int, model: str, n_prompt: int, finished):
        kind, req = job.req.kind, job.req
        results: dict[int, CompletionResult] = {}
        started: set[int] = set()
        status = 200

        def sse(obj: dict) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        try:
            while True:
                ev = await events.get()
                if ev[0] in ("delta", "done") and kind == "chat" and ev[1] not in started:
                    started.add(ev[1])
                    yield sse(P.chunk(kind, rid, model, created, ev[1], "", role=True))
                if ev[0] == "delta":
                    _, i, text, ids = ev
                    if text or (req.return_token_ids and ids):
                        yield sse(P.chunk(kind, rid, model, created, i, text,
                                          token_ids=ids if req.return_token_ids else None))
                elif ev[0] == "done":
                    r: CompletionResult = ev[2]
                    results[r.index] = r
                    last = len(results) == len(job.configs)
                    c = P.chunk(kind, rid, model, created, r.index, None if kind == "chat" else "", r.finish_reason)
                    if last and not req.include_usage:   # no usage chunk asked for: the last chunk carries both
                        ordered = _ordered(results)
                        c["usage"] = P.usage(n_prompt, sum(len(r.tokens) for r in ordered))
                        c["tandem"] = tandem_summary(ordered, engine.base.mode, job.queue_s)
                    yield sse(c)
                elif ev[0] == "error":
                    err = cloud_error(ev[1])
                    status = err.status
                    yield sse(err.body())
                    break
                elif ev[0] == "end":
                    break
            if status == 200 and req.include_usage:
                ordered = _ordered(results)
                yield sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                           "created": created, "model": model, "choices": [],
                           "usage": P.usage(n_prompt, sum(len(r.tokens) for r in ordered)),
                           "tandem": tandem_summary(ordered, engine.base.mode, job.queue_s)})
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            status = 499                  # the client disconnected mid-stream
            raise
        finally:
            finished(status)

    return app


def _ordered(results: dict) -> list[CompletionResult]:
    return [results[i] for i in sorted(results)]

