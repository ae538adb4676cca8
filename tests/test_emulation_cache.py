"""`--target-cache` and `--draft-cache` through the real daemons: the same text with and
without the caches, greedy and seeded T>0, and a warm second run that computes nothing.

Every run below is against an emulated verifier with an emulated edge, as the caches are
meant; the uncached pair is the reference. Timing never decides an outcome: greedy text is
the target's whatever the timing, the sampled runs fix gamma and window and turn cloud lead
off and keep chains (docs/exactness.md: then a seed fixes the text), and the warm run's zero misses use
stop-and-wait, whose requests do not depend on timing."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.harness import verifier_counters
from common.procs import ROOT, free_port, start_cloud
from edge.agent import Agent
from edge.client import VerifierClient
from edge.config import GenConfig
from kernels.sampling import SamplingConfig

from tests.conftest import PROMPTS

TARGET = "qwen3-32b-a100"
DEVICE = "custom:0.002+0"          # a fast device: the runs stay short on a loaded machine
N_NEW = 20


@pytest.fixture(scope="module")
def verifiers(tmp_path_factory):
    """(uncached, cached) emulated verifiers; the cached one's metrics address."""
    cache = tmp_path_factory.mktemp("rows")
    port = free_port()
    plain = start_cloud("--threads", "1", "--emulate-target", TARGET)
    cached = start_cloud("--threads", "1", "--emulate-target", TARGET, "--target-cache", str(cache),
                         "--metrics", f"127.0.0.1:{port}")
    yield plain, cached, f"127.0.0.1:{port}", cache
    cached.stop()
    plain.stop()


@pytest.fixture(scope="module")
def drafters(verifiers):
    """(plain, cached) drafters, each its own model instance."""
    from edge.derive import DEFAULT_DRAFT, ensure
    from edge.draft_cache import cached_drafter
    from edge.llama_model import LlamaDrafter
    path = ensure(DEFAULT_DRAFT, quiet=True)
    plain = LlamaDrafter(path, n_threads=1)
    cached = cached_drafter(LlamaDrafter(path, n_threads=1), path, verifiers[3], **LlamaDrafter.ROW_SETTINGS)
    yield plain, cached
    cached.close()
    plain.close()


def generate(address: str, drafter, tokenizer, prompt: str, cfg: GenConfig):
    client = VerifierClient(address)
    try:
        client.wait_ready()
        agent = Agent(client, drafter, tokenizer.fingerprint, tokenizer.n_vocab, tokenizer.eos)
        return agent.generate(tokenizer.encode(prompt), cfg)
    finally:
        client.close()


CONFIGS = {
    "greedy picospec": GenConfig(mode="picospec", max_tokens=N_NEW, stop_at_eos=False, adaptive=False,
                                 emulate_device=DEVICE),
    "greedy trees": GenConfig(mode="picospec", gamma=4, window=2, tree="always", adaptive=False, max_tokens=N_NEW,
                              stop_at_eos=False, emulate_device=DEVICE),      # branches in scratch sequences
    "sampled picospec Q": GenConfig(mode="picospec", codec="Q", gamma=3, window=2, adaptive=False, cloud_lead=False,
                                    sampling=SamplingConfig(temperature=0.8, top_k=8, seed=11), max_tokens=N_NEW,
                                    stop_at_eos=False, emulate_device=DEVICE, tree="off"),
    "sampled sync P": GenConfig(mode="sync", codec="P", gamma=4, adaptive=False,
                                sampling=SamplingConfig(temperature=0.8, top_k=8, seed=5), max_tokens=N_NEW,
                                stop_at_eos=False, emulate_device=DEVICE, tree="off"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_text_with_and_without_the_caches(name, verifiers, drafters, tokenizer):
    plain_cloud, cached_cloud, _, _ = verifiers
    cfg = CONFIGS[name]
    prompt = PROMPTS[list(CONFIGS).index(name)]
    want = generate(plain_cloud.address, drafters[0], tokenizer, prompt, cfg).tokens
    cold = generate(cached_cloud.address, drafters[1], tokenizer, prompt, cfg)
    warm = generate(cached_cloud.address, drafters[1], tokenizer, prompt, cfg)
    assert cold.tokens == want, "a cold cache changes nothing"
    assert warm.tokens == want, "rows from the store are the model's own"
    assert warm.stats.drafter["draft_cache_hits"] > 0


def test_a_warm_run_computes_no_row_and_reports_real_against_modelled(verifiers, drafters, tokenizer):
    _, cached_cloud, metrics, _ = verifiers
    cfg = CONFIGS["sampled sync P"]
    prompt = PROMPTS[5]
    generate(cached_cloud.address, drafters[1], tokenizer, prompt, cfg)
    before, drafted = verifier_counters(metrics), drafters[1].stats()
    warm = generate(cached_cloud.address, drafters[1], tokenizer, prompt, cfg)
    after = verifier_counters(metrics)
    d = {k: after[k] - before[k] for k in after}
    assert d["tandem_verifier_target_cache_misses"] == 0 and d["tandem_verifier_target_cache_hits"] > 0
    assert warm.stats.drafter["draft_cache_misses"] == drafted["draft_cache_misses"], "the drafter computed nothing"
    assert d["tandem_verifier_pass_modelled_seconds"] > 0
    from urllib.request import urlopen
    with urlopen(f"http://{metrics}/metrics", timeout=30) as r:
        text = r.read().decode()
    for name in ("pass_real_seconds", "pass_modelled_seconds", "passes_over_model", "target_cache_hits",
                 "target_cache_misses"):       # the names other tools read (docs/operations.md)
        assert f"\ntandem_verifier_{name}_total " in text, name
    s = warm.stats.as_dict()
    assert s["draft_steps"] > 0 and s["draft_modelled_s"] > 0 and s["draft_real_over_modelled"] is not None


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_the_caches_are_refused_where_nothing_is_emulated(tmp_path):
    r = cli("cloud.cli", "--listen", "127.0.0.1:0", "--target-cache", str(tmp_path))
    assert r.returncode == 2 and "--target-cache needs --emulate-target" in r.stderr
    r = cli("edge.cli", "generate", "--mode", "edge-only", "--draft-cache", str(tmp_path), "hi")
    assert r.returncode == 2 and "--draft-cache needs --emulate-device" in r.stderr


def test_edge_agent_generate_with_a_draft_cache(verifiers, tmp_path):
    """The flag end to end: the same text twice, the second from the store."""
    _, cached_cloud, _, _ = verifiers
    args = ["generate", "--cloud", cached_cloud.address, "--json", "--mode", "sync", "--gamma", "3",
            "--no-adaptive", "--max-tokens", "8", "--ignore-eos", "--emulate-device", DEVICE,
            "--draft-cache", str(tmp_path), "Name a colour."]
    runs = [cli("edge.cli", *args) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first["tokens"] == second["tokens"]
    assert second["stats"]["drafter_stats"]["draft_cache_misses"] == 0
    assert first["stats"]["drafter_stats"]["draft_cache_misses"] > 0
