"""Shared fixtures: the real verifier, the real link simulator, the real models."""
from __future__ import annotations

import time

import numpy as np
import pytest

from common.procs import start_cloud, start_link
from cloud.target import INVARIANT_BATCH

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis in two sentences.",
    "List three benefits of regular exercise.",
    "How do I reverse a list in Python?",
    "Tell me a short story about a brave mouse.",
    "What causes the seasons on Earth?",
    "Give me a recipe for pancakes.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Describe the water cycle.",
    "What is the difference between a virus and a bacterium?",
    "Write a limerick about a cat who loves coffee.",
    "Summarise the plot of Romeo and Juliet.",
    "What are prime numbers? Give examples.",
    "How does a refrigerator keep food cold?",
    "Suggest five names for a bakery.",
    "Explain what a neural network is to a child.",
    "What should I pack for a weekend camping trip?",
    "Compose a short thank-you note to a teacher.",
]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A real mosquitto on a loopback port, one per test module (tests may kill and
    restart it); skipped where mosquitto is not installed."""
    from common.mosquitto import Mosquitto
    try:
        b = Mosquitto(tmp_path_factory.mktemp("mqtt"))
    except FileNotFoundError as e:
        pytest.skip(str(e))
    yield b
    b.stop()


def wait_for(cond, what: str = "", timeout_s: float = 120.0) -> None:
    """Poll `cond` until it holds. The deadline only bounds how long a failure
    takes to report, so it is generous: a slow, loaded machine still passes."""
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """2 torch threads on a shared 2-core box spin on preempted peers (10x slower)."""
    import torch  # only the MoE suites use it; imported here once
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cloud():
    d = start_cloud("--threads", "1")  # edge and cloud share 2 cores: one thread each
    yield d
    d.stop()


@pytest.fixture(scope="session")
def wan(cloud):
    """The default WAN profile between edge and cloud."""
    d = start_link(cloud.address, "--profile", "picospec-wan")
    yield d
    d.stop()


@pytest.fixture(scope="session")
def tokenizer():
    from edge.llama_model import Tokenizer
    from edge.model_files import shipped_gguf
    return Tokenizer(shipped_gguf())


@pytest.fixture(scope="session")
def drafter():
    from edge.derive import DEFAULT_DRAFT, ensure
    from edge.llama_model import LlamaDrafter
    return LlamaDrafter(ensure(DEFAULT_DRAFT, quiet=True), n_threads=1)


class Reference:
    """The target's own greedy decoding, one token at a time, flash attention on."""

    def __init__(self):
        from edge.llama_model import LlamaDrafter
        from edge.model_files import shipped_gguf
        self.model = LlamaDrafter(shipped_gguf(), n_threads=1)
        self.cache: dict = {}

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        """Tokens and, per position, the gap between the top two logits."""
        key = (tuple(prompt), n)
        if key not in self.cache:
            self.model.truncate(0)
            for i in range(0, len(prompt), INVARIANT_BATCH):   # as the verifier does (cloud/target.py)
                logits = self.model.eval(prompt[i:i + INVARIANT_BATCH])
            out, gaps = [], []
            for _ in range(n):
                top2 = np.partition(logits, -2)[-2:]
                gaps.append(float(abs(top2[1] - top2[0])))
                tok = int(np.argmax(logits))
                out.append(tok)
                logits = self.model.eval([tok])
            self.cache[key] = (out, gaps)
        return self.cache[key]


@pytest.fixture(scope="session")
def reference():
    return Reference()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
