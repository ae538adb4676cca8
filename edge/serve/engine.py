"""The daemon's one drafter and one Agent, shared by every request.

A generation is blocking work (llama.cpp, gRPC threads) and the drafter holds
one sequence, so generations run one at a time on a single worker thread;
requests waiting for it are bounded (a full queue is refused with 429 and a
Retry-After from the measured request time). The Agent lives as long as the
daemon, so what it learned about the link carries over between requests.

A generation is stopped from inside its `on_tokens` callback, by raising
`StopGeneration`, when its client went away or a stop string was met: the
tokens after that are never computed and the next request gets the drafter.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from edge.config import GenConfig
from edge.serve.config import ServeConfig
from edge.serve.metrics import Metrics
from edge.serve.protocol import GenRequest, RequestError
from edge.serve.text import TextStream
from kernels.sampling import SamplingConfig

log = logging.getLogger("tandem.serve")


class StopGeneration(BaseException):
    """Raised from on_tokens to end a generation early. A BaseException (like
    asyncio.CancelledError) so that no `except Exception` on the way through
    the Agent's loops mistakes it for a failure and retries or falls back."""


@dataclass(eq=False)      # identity: jobs live in a set
class Job:
    """One request's completions. `emit` is called from the worker thread with
    ("delta", index, text, token_ids) and ("done", index, CompletionResult)."""
    req: GenRequest
    prompt: list[int]
    configs: list[GenConfig]
    emit: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    t_admitted: float = field(default_factory=time.monotonic)
    t_started: float | None = None     # when the worker took it: queue time = t_started - t_admitted
    released: bool = False             # its place in the queue was given back (Engine.release)

    @property
    def queue_s(self) -> float:
        return (self.t_started or time.monotonic()) - self.t_admitted


@dataclass
class CompletionResult:
    index: int
    text: str
    tokens: list[int]
    finish_reason: str
    stats: object                      # edge.stats.GenStats
    segments: list[dict]
    seed: int


def segments_of(stats, n_tokens: int, mode: str) -> list[dict]:
    """Who produced which stretch of the text: `stats.segments` where the agent
    records them; else a summary from the counters (cloud-verified tokens
    first, then the edge-only ones)."""
    segs = getattr(stats, "segments", None)
    if segs is not None:      # cut to the tokens the client got (a stop may end a committed batch early)
        out, left = [], n_tokens
        for s in segs:
            if left <= 0:
                break
            out.append({**s, "tokens": min(int(s["tokens"]), left)})
            left -= out[-1]["tokens"]
        return out
    edge = min(stats.edge_only_tokens, n_tokens)
    verified_mode = stats.fallback if stats.fallback == "cloud-only" else mode
    out = []
    if n_tokens - edge:
        out.append({"mode": verified_mode, "tokens": n_tokens - edge})
    if edge:
        out.append({"mode": "edge-only", "tokens": edge})
    return out


def tandem_summary(results: list[CompletionResult], mode: str, queue_s: float) -> dict:
    """The `tandem` object of a response: how its text was made."""
    stats = [r.stats for r in results]
    drafted, verified = sum(s.drafted for s in stats), sum(s.verified for s in stats)
    accepted = sum(s.accepted for s in stats)
    segments = []
    for r in results:
        for s in r.segments:
            segments.append({**s, "index": r.index} if len(results) > 1 else s)
    wall = sum(s.wall_s for s in stats)
    tokens = sum(len(r.tokens) for r in results)
    return {"mode": mode, "fallback": next((s.fallback for s in stats if s.fallback), None),
            "acceptance_rate": round(accepted / verified, 4) if verified else None,
            "drafted": drafted, "verified": verified, "accepted": accepted,
            "bytes_up": sum(s.bytes_up for s in stats), "bytes_down": sum(s.bytes_down for s in stats),
            "emulated": any(s.emulated for s in stats), "segments": segments,
            "edge_only_tokens": sum(s.edge_only_tokens for s in stats),
            "ttft_s": round(stats[0].ttft_s, 4) if stats else None,
            "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
            "queue_s": round(queue_s, 4), "seeds": [r.seed for r in results],
            "codec": next((s.codec for s in stats if s.codec), None)}


class Engine:
    def __init__(self, agent, tokenizer, base: GenConfig, cfg: ServeConfig, metrics: Metrics):
        self.agent, self.tok, self.base, self.cfg, self.metrics = agent, tokenizer, base, cfg, metrics
        self.n_ctx = cfg.n_ctx
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._lock = threading.Lock()
        self._admitted = 0           # running + waiting
        self._running = 0
        self._avg_request_s = 5.0    # for Retry-After; measured as requests finish
        self._closed = False
        self._jobs: set[Job] = set()
        self._formatter = None

    # -- admission -----------------------------------------------------------
    def admit(self) -> None:
        """Take a place in the queue, or RequestError 429 with Retry-After."""
        with self._lock:
            if self._closed:
                raise RequestError("the daemon is shutting down", status=503, code="shutting_down")
            if self._admitted >= 1 + self.cfg.queue_size:
                retry = max(1, math.ceil(self._avg_request_s * self._admitted))
                self.metrics.rejected.inc()
                raise RequestError(f"too many requests: {self._admitted - 1} waiting (queue size "
                                   f"{self.cfg.queue_size}); retry in {retry} s", status=429,
                                   code="queue_full", headers={"Retry-After": str(retry)})
            self._admitted += 1
            self._publish_queue()

    def release(self, job: "Job") -> None:
        """Give the job's place back; idempotent. The HTTP side calls it when its
        client is done or gone, the worker when the job ends: whichever comes
        first (a stream whose client vanished before its first byte is never
        iterated, so its handler never gets to say so)."""
        with self._lock:
            if job.released:
                return
            job.released = True
            self._admitted -= 1
            self._publish_queue()

    def _publish_queue(self) -> None:
        self.metrics.queue(self._admitted - self._running, self._running)

    # -- prompts -------------------------------------------------------------
    def _chat_format(self):
        if self._formatter is None:   # compiling the template once, not per request
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
            self._formatter = Jinja2ChatFormatter(self.tok.template, eos_token="", bos_token="",
                                                  add_generation_prompt=True)
        return self._formatter

    def prompt_tokens(self, req: GenRequest) -> list[int]:
        tok = self.tok
        if req.kind == "chat":
            if not tok.template:
                raise RequestError("the model has no chat template: use /v1/completions", "messages")
            try:
                text = self._chat_format()(messages=req.messages).prompt
            except Exception as e:   # a template that refuses these messages (roles, order)
                raise RequestError(f"the model's chat template refused these messages: {e}", "messages") from None
            return tok.llm.tokenize(text.encode(), add_bos=tok.add_bos, special=True)
        if req.prompt_tokens is not None:
            bad = next((t for t in req.prompt_tokens if not 0 <= t < tok.n_vocab), None)
            if bad is not None:
                raise RequestError(f"'prompt': token id {bad} is outside the vocabulary (0..{tok.n_vocab - 1})",
                                   "prompt")
            return list(req.prompt_tokens)
        return tok.encode(req.prompt_text, raw=True)

    def configs(self, req: GenRequest, prompt_len: int) -> list[GenConfig]:
        room = self.n_ctx - prompt_len
        if room < 1:
            raise RequestError(f"the prompt has {prompt_len} tokens; the context holds {self.n_ctx}", "messages"
                               if req.kind == "chat" else "prompt", code="context_length_exceeded")
        key = req.max_tokens_field
        if req.max_tokens is None:
            max_tokens = min(room, self.cfg.default_max_tokens if req.kind == "chat" else 16)
        elif req.max_tokens > room:
            raise RequestError(f"'{key}' {req.max_tokens} exceeds the context left for this prompt: "
                               f"{self.n_ctx} - {prompt_len} prompt tokens = {room}", key,
                               code="context_length_exceeded")
        else:
            max_tokens = req.max_tokens
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        out = []
        for i in range(req.n):   # completion i uses seed + i, as `edge-agent generate --n` does
            # the API's seed is an int64, the wire's a uint64: the same 2**64 residues either way
            sampling = SamplingConfig(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                      seed=(seed + i) % (1 << 64))
            out.append(dataclasses.replace(self.base, max_tokens=max_tokens, sampling=sampling,
                                           stop_at_eos=not req.ignore_eos))
        return out

    # -- generation ------------------------------------------------------------
    def submit(self, job: Job):
        """Queue the job on the worker; returns its concurrent Future."""
        with self._lock:
            self._jobs.add(job)
        return self._worker.submit(self._run, job)

    def _run(self, job: Job) -> None:
        """Worker thread: the job's completions, then ("end",); a failure is
        reported as ("error", exception) and never kills the worker."""
        try:
            if job.cancelled.is_set():
                return               # its client left while it waited
            with self._lock:
                self._running += 1
                self._publish_queue()
            job.t_started = time.monotonic()
            self.metrics.queue_seconds.observe(job.t_started - job.t_admitted)
            try:
                for i, cfg in enumerate(job.configs):
                    job.emit(("done", i, self._complete(job, i, cfg)))
                    if job.cancelled.is_set():
                        break
            except Exception as e:
                log.warning("generation failed: %s: %s", type(e).__name__, e)
                job.emit(("error", e))
            finally:
                with self._lock:
                    self._running -= 1
                    self._publish_queue()
                    spent = time.monotonic() - job.t_started
                    self._avg_request_s = 0.8 * self._avg_request_s + 0.2 * spent
        finally:
            with self._lock:
                self._jobs.discard(job)
            job.emit(("end",))
            self.release(job)

    def _complete(self, job: Job, index: int, cfg: GenConfig) -> CompletionResult:
        agent, tok = self.agent, self.tok
        text = TextStream(lambda ids: tok.llm.detokenize(list(ids)), job.req.stops,
                          eos=tok.eos if cfg.stop_at_eos else None)
        pieces: list[str] = []
        sent = 0

        def on_tokens(new: list[int]) -> None:
            nonlocal sent
            if job.cancelled.is_set():
                raise StopGeneration()
            self.metrics.committed(len(new))
            delta = text.push(new)
            if delta or text.stopped:
                ids = text.tokens[sent:]
                sent = len(text.tokens)
                pieces.append(delta)
                job.emit(("delta", index, delta, ids))
            if text.stopped:
                raise StopGeneration()     # a stop string or end of sequence: nothing more is needed

        client = agent.client
        bytes0 = (client.bytes.up, client.bytes.down) if client is not None else (0, 0)
        t0 = time.monotonic()
        try:
            stats = agent.generate(job.prompt, cfg, on_tokens).stats
        except StopGeneration:
            # Cut short: the agent's counters so far, finished here as generate would have.
            stats = agent.live_stats
            if stats is None:
                from edge.stats import GenStats
                stats = GenStats(mode=cfg.mode)
            stats.wall_s = time.monotonic() - t0
            if client is not None:
                stats.bytes_up = client.bytes.up - bytes0[0]
                stats.bytes_down = client.bytes.down - bytes0[1]
            if job.cancelled.is_set():
                self.metrics.cancelled.inc()
                log.info("request cancelled: its client went away after %d tokens", len(text.tokens))
        if not text.stopped:
            rest = text.finish()
            if rest or text.stopped:
                pieces.append(rest)
                job.emit(("delta", index, rest, text.tokens[sent:]))
                sent = len(text.tokens)
        reason = text.finish_reason or "length"
        segments = segments_of(stats, len(text.tokens), cfg.mode)
        self.metrics.completion(stats, len(job.prompt), len(text.tokens), reason, segments, agent.link_rtt_s)
        return CompletionResult(index, "".join(pieces), list(text.tokens), reason, stats, segments,
                                cfg.sampling.seed)

    def cancel_all(self) -> None:
        """Stop taking requests; end the running and waiting ones at their next token."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        for j in jobs:
            j.cancelled.set()

    def close(self) -> None:
        self.cancel_all()
        self._worker.shutdown(wait=True, cancel_futures=True)
