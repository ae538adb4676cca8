"""cloud-verifier configuration: one dataclass, filled from the command line."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WAIT_POLICIES = ("auto", "active", "passive")


@dataclass
class VerifierConfig:
    listen: str = "127.0.0.1:50051"
    model: Path | None = None           # None: the shipped SmolLM2-135M
    n_ctx: int = 2048                   # per session
    threads: int = 0                    # llama.cpp threads; 0: probe at start-up, then keep choosing while serving
    wait_policy: str = "auto"           # OpenMP idle threads: spin (active) or sleep (passive); auto: see cli
    max_sessions: int = 8               # every RPC that holds a sequence counts (Open'ed sessions, Generate)
    max_draft: int = 32
    tree_seqs: int = 3                  # scratch sequences for draft trees' branches (0: chains only)
    max_batch_tokens: int = 256         # tokens in one scheduler pass
    batching: bool = True               # False: one session per pass (for comparison)
    gpu_layers: int = 0                 # llama.cpp n_gpu_layers (a CUDA build of llama-cpp-python)
    kv_unified: bool = False            # one KV buffer shared by all sequences (start-up check decides exactness)
    require_bitwise: bool = False       # refuse to start when batched passes are not bit-identical
    idle_timeout_s: float = 300.0
    p_top_k: int = 16                   # codec P payload: top-K entries ...
    p_tail: int = 4                     # ... and pre-drawn tail samples
    token: str | None = None            # bearer token required in metadata, if set (cloud/auth.py)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None   # mutual TLS: clients need a certificate from this CA
    insecure: bool = False              # serve off loopback without authentication, on purpose
    emulate_target: str | None = None   # a sim.latency TARGETS profile
    target_cache: Path | None = None    # memoise the emulated target's rows here (cloud/target_cache.py)
    metrics: str | None = None          # HOST:PORT for Prometheus metrics
    max_message_bytes: int = 1 << 20    # largest request accepted
    retry_after_s: float = 2.0          # hint sent with RESOURCE_EXHAUSTED
    slo_tokens_per_s: float | None = None   # admit a session only while every one is predicted to keep this
    slo_headroom: float = 0.1               # ... aiming that prediction at slo * (1 + headroom)
    grace_s: float = 5.0

    def __post_init__(self):
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if not 0 <= self.tree_seqs <= 64:
            raise ValueError("tree_seqs must be in 0..64")
        if not 1 <= self.max_draft <= 256:
            raise ValueError("max_draft must be in 1..256")
        if self.max_batch_tokens < self.max_draft + 2:
            raise ValueError(f"max_batch_tokens must be >= max_draft + 2 = {self.max_draft + 2} "
                             "(a block is never split across passes)")
        if self.gpu_layers < -1:
            raise ValueError("gpu_layers must be >= 0, or -1 for every layer")
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0: measure)")
        if self.wait_policy not in WAIT_POLICIES:
            raise ValueError(f"wait_policy must be one of {', '.join(WAIT_POLICIES)}")
        if self.n_ctx < 16:
            raise ValueError("n_ctx must be >= 16")
        if self.slo_tokens_per_s is not None and not self.slo_tokens_per_s > 0:
            raise ValueError("slo_tokens_per_s must be > 0")
        if not 0 <= self.slo_headroom < 1:
            raise ValueError("slo_headroom must be in [0, 1)")
        if self.target_cache is not None and self.emulate_target is None:
            raise ValueError("--target-cache needs --emulate-target: it skips the target's real compute, "
                             "which only an emulated target's modelled time stands in for")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
