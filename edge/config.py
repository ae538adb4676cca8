"""edge-agent configuration for one generation request: one dataclass."""
from __future__ import annotations

from dataclasses import dataclass

from kernels.sampling import SamplingConfig

MODES = ("picospec", "sync", "cloud-only", "edge-only")
CODECS = ("P", "Q", "auto")
TREES = ("off", "auto", "always")


@dataclass
class GenConfig:
    mode: str = "picospec"
    codec: str = "auto"
    max_tokens: int = 128
    sampling: SamplingConfig = SamplingConfig()
    gamma: int | None = None          # None: adapt
    window: int | None = None         # None: adapt (picospec only)
    adaptive: bool = True             # may fall back to cloud-only when speculation does not pay
    cloud_lead: bool = True           # picospec: the verifier decodes on while no block is queued
    lead_first: int = 0               # >0: the verifier leads exactly the first N positions, never later ones
    q_top_k: int = 16                 # codec Q: entries of the sparse q sent per drafted token
    stop_at_eos: bool = True
    emulate_device: str | None = None
    stall_timeout_s: float = 30.0     # no verdict for this long: the cloud is considered lost
    uplink_share: float = 0.25        # codec auto: assumed uplink/downlink rate ratio
    # draft trees: off (chains), auto (where the planner predicts a gain), always. Off by default
    # until auto measures at least chains' speed in every cell (docs/measurements.md, Draft trees)
    tree: str = "off"
    require_cloud: bool = False       # verifier unreachable or lost: fail instead of serving edge-only text

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; choose from {', '.join(CODECS)}")
        if self.tree not in TREES:
            raise ValueError(f"unknown tree setting {self.tree!r}; choose from {', '.join(TREES)}")
        if self.tree == "always" and self.codec == "P" and not self.sampling.greedy:
            raise ValueError("--tree always needs codec Q (or auto) at T>0: codec P cannot carry draft trees "
                             "(the verifier would need q's whole support)")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.gamma is not None and not 1 <= self.gamma <= 64:
            raise ValueError("gamma must be in 1..64")
        if self.window is not None and not 1 <= self.window <= 32:
            raise ValueError("window must be in 1..32")

    @property
    def pipelined(self) -> bool:
        return self.mode == "picospec"
