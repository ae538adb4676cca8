"""The verifier's thread choice while serving (cloud/threads.py), driven with pass
times made up from a cost per thread count: no model, no clock."""
import itertools

import pytest

from cloud.threads import ThreadTuner, candidates, size_bucket


def serve(tuner: ThreadTuner, cost, passes: int, sizes=(1, 8, 1, 3)) -> list[int]:
    """Run `passes` passes; cost(threads, n_tokens) gives each one's seconds."""
    used = []
    for n in itertools.islice(itertools.cycle(sizes), passes):
        t = tuner.active
        used.append(t)
        tuner.observe(n, cost(t, n))
    return used


def loaded(t: int, n: int) -> float:
    """Two threads on two shared cores: every pass waits on a preempted peer."""
    return (0.010 + 0.002 * n) * (1.0 if t == 1 else 4.0)


def idle(t: int, n: int) -> float:
    return (0.010 + 0.002 * n) * (1.0 if t == 2 else 1.6)


def test_moves_off_a_count_that_load_made_slow():
    tuner = ThreadTuner((1, 2), current=2, explore_every=32, trial=8)
    used = serve(tuner, loaded, 400)
    assert tuner.current == 1 and tuner.switches == 1
    assert used[-100:].count(2) == 0          # no trial of 2 threads in a while: it lost and waits longer


def test_keeps_the_faster_count_and_tries_the_other_less_and_less():
    tuner = ThreadTuner((1, 2), current=2, explore_every=32, trial=8, max_wait=256)
    used = serve(tuner, idle, 2000)
    assert tuner.current == 2 and tuner.switches == 0
    trials_early, trials_late = used[:500].count(1), used[1500:].count(1)
    assert 0 < trials_late < trials_early      # it keeps checking, ever more rarely


def test_follows_the_machine_when_load_comes_and_goes():
    tuner = ThreadTuner((1, 2), current=2, explore_every=32, trial=8, max_wait=64)
    serve(tuner, loaded, 600)
    assert tuner.current == 1
    serve(tuner, idle, 1200)
    assert tuner.current == 2


def test_compares_passes_of_the_same_size_only():
    # 2 threads is faster at every size; the trial sees only 32-token passes, the
    # current count's record only 1-token ones: nothing to compare, no switch
    tuner = ThreadTuner((1, 2), current=1, explore_every=16, trial=4)
    serve(tuner, lambda t, n: 0.01 * n / t, 16, sizes=(1,))
    serve(tuner, lambda t, n: 0.01 * n / t, 40, sizes=(32,))
    assert tuner.current == 1
    assert tuner.active == 1                   # the stuck trial was given up


def test_one_candidate_never_explores():
    tuner = ThreadTuner((1,), current=1, explore_every=4, trial=2)
    assert set(serve(tuner, loaded, 100)) == {1}


def test_current_must_be_a_candidate():
    with pytest.raises(ValueError, match="not among"):
        ThreadTuner((1, 2), current=3)


@pytest.mark.parametrize("cpus, want", [(1, (1,)), (2, (1, 2)), (6, (1, 2, 4, 6)), (16, (1, 2, 4, 8, 16))])
def test_candidates(cpus, want):
    assert candidates(cpus) == want


def test_size_buckets():
    assert [size_bucket(n) for n in (0, 1, 2, 3, 4, 7, 8, 255)] == [0, 0, 1, 1, 2, 2, 3, 7]


def test_the_verifier_tunes_one_token_and_larger_passes_apart():
    """The daemon's per-pass hook drives a real Target's two thread counts and their gauges:
    here one-token passes run faster with 1 thread (a stream beside its edge), passes of 8
    with 2 (llama.cpp's n_threads and n_threads_batch)."""
    from cloud.daemon import thread_keeper
    from cloud.metrics import Metrics
    from cloud.scheduler import PassStats
    from cloud.target import Target
    from edge.model_files import shipped_gguf

    def mixed(t: int, n: int) -> float:
        return loaded(t, n) if n == 1 else idle(t, n)

    target = Target(shipped_gguf(), n_ctx=64, n_seqs=1, n_threads=2)
    try:
        metrics = Metrics()
        on_pass = thread_keeper(target, metrics, (1, 2))
        seen = set()
        for n in itertools.islice(itertools.cycle((1, 8)), 600):
            t = target.n_threads_single if n == 1 else target.n_threads
            seen.add((n, t))
            real = mixed(t, n)
            on_pass(PassStats(n, 1, max(real, 0.5), real_s=real))   # an emulated hold hides the real time
        assert (target.n_threads_single, target.n_threads) == (1, 2)
        assert seen == {(1, 1), (1, 2), (8, 1), (8, 2)}, "each class tried the other count"
        assert metrics.registry.get_sample_value("tandem_verifier_threads") == 2
        assert metrics.registry.get_sample_value("tandem_verifier_threads_single_token") == 1
    finally:
        target.close()


def test_a_short_stream_gets_its_first_trial_early():
    """The start-up probe's count can be wrong under load from the first pass: a 64-pass stream
    must not end before the other count is tried."""
    tuner = ThreadTuner((1, 2), current=2, explore_every=128, trial=12, first_trial=16)
    used = serve(tuner, loaded, 64, sizes=(1,))
    assert tuner.current == 1 and used[16] == 1 and used[-20:] == [1] * 20


def test_after_a_lost_first_trial_the_wait_is_the_usual_one():
    tuner = ThreadTuner((1, 2), current=2, explore_every=128, trial=12, first_trial=16)
    used = serve(tuner, idle, 300, sizes=(1,))
    assert tuner.current == 2 and used[16:28] == [1] * 12       # tried early, lost
    assert used[28:28 + 120].count(1) == 0 and 1 in used[28:200]  # then about explore_every later
