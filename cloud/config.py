"""cloud-verifier configuration: one dataclass, filled from the command line."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class VerifierConfig:
    listen: str = "127.0.0.1:50051"
    model: Path | None = None           # None: the shipped SmolLM2-135M
    n_ctx: int = 2048
    threads: int = 2
    max_sessions: int = 8
    max_draft: int = 32
    idle_timeout_s: float = 300.0
    p_top_k: int = 16                   # codec P payload: top-K entries ...
    p_tail: int = 4                     # ... and pre-drawn tail samples
    token: str | None = None            # bearer token required in metadata, if set
    tls_cert: Path | None = None
    tls_key: Path | None = None
    emulate_target: str | None = None   # a sim.latency TARGETS profile
    grace_s: float = 5.0

    def __post_init__(self):
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if not 1 <= self.max_draft <= 256:
            raise ValueError("max_draft must be in 1..256")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
