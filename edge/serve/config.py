"""edge-agent serve configuration: one dataclass, filled from flags and --config."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    queue_size: int = 8               # requests that may wait behind the running one; more get 429
    default_max_tokens: int = 256     # chat requests without max_tokens (completions: 16, as the API)
    n_ctx: int = 2048                 # prompt + max_tokens must fit (the drafter's and verifier's context)
    max_n: int = 8                    # most completions per request
    served_model_name: str | None = None   # None: the verifier's target, as it names it
    edge_id: str = "edge"
    mqtt: str | None = None           # mqtt://HOST:PORT: publish telemetry there
    telemetry_interval_s: float = 5.0
    health_interval_s: float = 5.0    # how often the verifier's reachability is probed

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range")
        if self.queue_size < 0:
            raise ValueError("--queue-size must be >= 0")
        if self.default_max_tokens < 1:
            raise ValueError("--max-tokens must be >= 1")
        if not 1 <= self.max_n <= 64:
            raise ValueError("--max-n must be in 1..64")
        if self.telemetry_interval_s <= 0:
            raise ValueError("--telemetry-interval must be > 0")
        if not self.edge_id or "/" in self.edge_id or "+" in self.edge_id or "#" in self.edge_id:
            raise ValueError("--id must be non-empty and free of MQTT's '/', '+' and '#'")
