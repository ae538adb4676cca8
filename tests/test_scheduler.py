"""The scheduler's rules, with the real target: decodes never wait behind a long
prompt, a pass stays within its token budget, --no-batching runs one step per
pass, an emulated pass lasts at least its modelled time. Steps are queued
before the loop starts (or all at once), so what shares a pass is decided by
the rules, never by timing."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import numpy as np
import pytest

from cloud.scheduler import PassStats, Scheduler, Step
from cloud.target import Target
from edge.model_files import shipped_gguf
from sim.latency import LatencyProfile


@pytest.fixture(scope="module")
def target():
    t = Target(shipped_gguf(), n_ctx=512, n_seqs=4, n_threads=1, max_batch_tokens=64)
    yield t
    t.close()


def tokens(n: int, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(100, 40000, size=n)]


def run(target, steps, budget: int | None = None, **kw) -> tuple[list[PassStats], list[str], dict]:
    for s in range(target.n_seqs):
        target.clear(s)
    passes: list[PassStats] = []
    order: list[str] = []
    done_in: dict = {}
    sched = Scheduler(target, on_pass=passes.append, **kw)
    if budget is not None:
        sched.set_budget(budget)

    def done(name):
        def record(_):                      # on the scheduler's thread, as the step resolves
            order.append(name)
            done_in[name] = len(passes)
        return record
    for name, step in steps:
        step.future.add_done_callback(done(name))
    sched.submit_many([s for _, s in steps])
    sched.start()
    for _, s in steps:
        s.future.result(timeout=120)
    sched.stop()
    return passes, order, done_in


def test_decodes_are_not_held_behind_a_long_prompt(target):
    prompt = Step(0, 0, tokens(200), 1, prefill=True)
    decode = Step(1, 0, tokens(5, 1), 5)
    passes, order, done_in = run(target, [("prompt", prompt), ("decode", decode)], prefill_chunk=32)
    assert done_in["decode"] == 0, "the decode step ran in the first pass"
    assert order == ["decode", "prompt"]
    assert len(passes) >= 200 // 32, "the prompt was chunked"
    assert all(p.tokens <= 64 for p in passes)


def test_a_chore_never_holds_decodes_behind_the_prompts_queued_before_it(target):
    """A session ends (its sequence's chore is queued) while a long prompt is still being
    prefilled and a streaming session queues its next token after the chore. The chore
    runs before the next pass and the token rides in it, beside a chunk of the prompt;
    waiting its turn, the chore held the token until the whole prompt was in (measured
    in tandem-bench capacity: 8 passes, 0.8 s, without a token for every live stream)."""
    prompt = Step(0, 0, tokens(200), 1, prefill=True)
    chore = Step(-1, 0, [], 0, chore=lambda: "freed")
    decode = Step(1, 0, tokens(1, 1), 1)
    passes, order, done_in = run(target, [("prompt", prompt), ("chore", chore), ("decode", decode)],
                                 prefill_chunk=32)
    assert order[:2] == ["chore", "decode"] and done_in["decode"] == 0
    assert chore.future.result() == "freed"
    assert passes[0].tokens == 1 + 32 and len(passes) >= 200 // 32


def test_a_pass_keeps_to_the_token_budget(target):
    steps = [(f"s{i}", Step(i, 0, tokens(30, i), 30)) for i in range(4)]   # 120 tokens, budget 64
    passes, _, _ = run(target, steps)
    assert [p.tokens for p in passes] == [60, 60], "two whole blocks per pass, never a split block"


def test_a_budget_set_later_bounds_passes_and_keeps_room_for_decodes(target):
    """An SLO's budget of 40 (under two 32-token prefill chunks): a prompt gets 20 tokens a
    pass, and each 15-token block rides beside a chunk instead of waiting for the prompt."""
    prompt = Step(0, 0, tokens(100), 1, prefill=True)
    blocks = [(f"b{i}", Step(i, 0, tokens(15, i), 15)) for i in (1, 2)]
    passes, _, done_in = run(target, [("prompt", prompt), *blocks], budget=40, prefill_chunk=32)
    assert [p.tokens for p in passes] == [35, 35, 20, 20, 20]
    assert (done_in["b1"], done_in["b2"]) == (0, 1), "one block in each of the first two passes"


def test_no_batching_runs_one_step_per_pass(target):
    steps = [(f"s{i}", Step(i, 0, tokens(3, i), 3)) for i in range(4)]
    passes, order, _ = run(target, steps, batching=False)
    assert [p.steps for p in passes] == [1, 1, 1, 1] and order == ["s0", "s1", "s2", "s3"]


def test_batched_steps_share_one_pass_and_get_their_own_rows(target):
    got = {}
    steps = []
    for i in range(4):
        st = Step(i, 0, tokens(4 + i, i), 2)
        steps.append(st)
    for i, st in enumerate(steps):
        st.future.add_done_callback((lambda i: lambda f: got.__setitem__(i, f.result()))(i))
    passes: list[PassStats] = []
    for s in range(4):
        target.clear(s)
    sched = Scheduler(target, on_pass=passes.append)
    sched.submit_many(steps)
    sched.start()
    for st in steps:
        st.future.result(timeout=120)
    sched.stop()
    assert [(p.steps, p.tokens) for p in passes] == [(4, 4 + 5 + 6 + 7)]
    assert all(got[i].shape == (2, target.n_vocab) for i in range(4))
    assert not np.array_equal(got[0], got[1]), "each step gets its own sequence's rows"


def test_an_emulated_pass_lasts_its_modelled_time(target):
    profile = LatencyProfile("test", 0.2, 0.01, "test")
    steps = [(f"s{i}", Step(i, 0, tokens(5, i), 1)) for i in range(2)]
    passes, _, _ = run(target, steps, emulate=profile)
    assert len(passes) == 1 and passes[0].seconds >= profile.forward_s(10)


def test_an_emulated_pass_tells_its_steps_when_it_ends(target):
    """Rows are handed over when the real pass is done (the session uses them during the
    hold), with the modelled end of the pass: the verifier answers no earlier than that."""
    import time
    profile = LatencyProfile("test", 0.3, 0.0, "test")
    sched = Scheduler(target, emulate=profile)
    sched.start()
    try:
        t0 = time.monotonic()
        step = Step(0, 0, tokens(4), 1)
        sched.submit(step).result(timeout=120)
        assert step.ready_at >= t0 + profile.forward_s(4)
    finally:
        sched.stop()
        target.clear(0)


def test_an_emulated_pass_starts_when_the_last_one_ended(target):
    """A step queued while a pass runs starts the modelled device's next pass at that pass's
    modelled end, however late the scheduler's thread gets to it (here an on_pass that
    takes 0.25 s stands for a busy CPU); one queued to an idle verifier starts when it came."""
    profile = LatencyProfile("test", 0.5, 0.0, "test")   # far above a 1-4 token real pass
    for s in range(2):
        target.clear(s)
    passes: list[PassStats] = []
    sched = Scheduler(target, emulate=profile, on_pass=lambda p: (passes.append(p), time.sleep(0.25)))
    a, b = Step(0, 0, tokens(4), 1), Step(0, 4, tokens(1, 1), 1)   # one sequence: two passes
    sched.submit_many([a, b])
    sched.start()
    try:
        b.future.result(timeout=120)
        assert b.ready_at - a.ready_at == pytest.approx(profile.forward_s(1), abs=1e-6)

        first = Step(1, 0, tokens(3, 2), 1)
        sched.submit(first).result(timeout=120)
        time.sleep(max(0.0, first.ready_at - time.monotonic()) + 0.5)   # the device idles
        late = Step(1, 3, tokens(1, 3), 1)
        sched.submit(late).result(timeout=120)
        assert late.ready_at >= late.queued_at + profile.forward_s(1) - 1e-6
    finally:
        sched.stop()
        for s in range(2):
            target.clear(s)
    # the second pass lasted its modelled time as the device saw it, not the thread's 0.25 s more
    assert passes[1].seconds < profile.forward_s(1) + 0.25 - 0.05


def test_a_callable_follows_is_asked_at_the_pass_end(target):
    """A pipelined session's step follows only when its next block is already queued: the
    scheduler asks at the pass end, and holds the next pass for the sessions that said yes
    (c, queued first, waits to share it with b's next step)."""
    asked: list[int] = []
    for s in range(3):
        target.clear(s)
    sched = Scheduler(target, follow_s=30.0, follow_max_s=30.0)
    a = Step(0, 0, tokens(3, 0), 1, follows=lambda: asked.append(0) or False)
    b = Step(1, 0, tokens(3, 1), 1, follows=lambda: asked.append(1) or True)
    b2, c = Step(1, 3, [12], 1), Step(2, 0, tokens(2, 2), 1)
    _follow_up(sched, a, c, 0.05)
    _follow_up(sched, b, b2, 0.3)
    sched.submit_many([a, b])
    sched.start()
    try:
        b2.future.result(timeout=120)
        c.future.result(timeout=120)
        assert sorted(asked) == [0, 1]
        assert sched.passes == 2, "c and b's next step shared the second pass"
    finally:
        sched.stop()
        for s in range(3):
            target.clear(s)


def test_a_step_no_pass_has_started_can_be_withdrawn(target):
    """A lead waiting for its pass gives way to the edge's block (cloud/server.py
    `_lead_rows`): withdrawn while queued, its future is cancelled and it never runs; once a
    pass has it, it cannot be."""
    for s in range(2):
        target.clear(s)
    passes: list[PassStats] = []
    sched = Scheduler(target, on_pass=passes.append)
    a, lead = Step(0, 0, tokens(3), 1), Step(1, 0, tokens(2, 1), 1)
    sched.submit_many([a, lead])
    assert sched.withdraw(lead) and lead.future.cancelled()
    sched.start()
    try:
        a.future.result(timeout=120)
        assert not sched.withdraw(a), "a pass already ran it"
        assert sched.queued == 0
    finally:
        sched.stop()
        for s in range(2):
            target.clear(s)
    assert [p.steps for p in passes] == [1]


def test_a_step_withdrawn_while_the_pass_waits_leaves_the_loop_serving(target):
    """The only queued step is withdrawn while the next pass waits for followers (as the
    event loop withdraws a lead whose edge's block came): the pass has nothing to run, and
    the loop goes back to waiting instead of dying (it did: every session of a capacity run
    then stalled). The withdrawal is made inside that wait, so no timing decides the order."""
    for s in range(3):
        target.clear(s)
    lead = Step(1, 0, tokens(2, 1), 1)

    class WithdrawnWhileWaiting(Scheduler):
        def _await_followers(self) -> None:
            if not lead.future.done():
                assert self.withdraw(lead)          # the condition's lock is reentrant
            super()._await_followers()

    # emulated, as in the capacity bench: the pass's modelled start is where the empty batch broke it
    sched = WithdrawnWhileWaiting(target, emulate=LatencyProfile("test", 0.05, 0.0, "test"))
    sched.submit(lead)
    sched.start()
    try:
        with pytest.raises(futures.CancelledError):       # withdrawn before any pass took it
            lead.future.result(timeout=60)
        later = Step(2, 0, tokens(2, 2), 1)
        assert sched.submit(later).result(timeout=60).shape == (1, target.n_vocab)
    finally:
        sched.stop()
        for s in range(3):
            target.clear(s)


def _follow_up(sched: Scheduler, first: Step, nxt: Step, delay_s: float) -> None:
    """When `first` resolves, queue `nxt` after `delay_s` (as a session's event loop would)."""
    def go(_):
        threading.Timer(delay_s, sched.submit, (nxt,)).start()
    first.future.add_done_callback(go)


def test_sessions_that_go_on_at_once_share_the_next_pass(target):
    """Two leading sessions answer at the same pass end and queue their next steps one after
    the other: the next pass waits for both instead of starting with the first."""
    for s in range(2):
        target.clear(s)
    passes: list[PassStats] = []
    sched = Scheduler(target, on_pass=passes.append, follow_s=30.0, follow_max_s=30.0)
    a, b = Step(0, 0, tokens(3, 0), 1, follows=True), Step(1, 0, tokens(3, 1), 1, follows=True)
    a2, b2 = Step(0, 3, [11], 1, follows=True), Step(1, 3, [12], 1, follows=True)
    _follow_up(sched, a, a2, 0.0)
    _follow_up(sched, b, b2, 0.3)               # the second session is late: the pass waits for it
    sched.submit_many([a, b])
    sched.start()
    for st in (a, b, a2, b2):
        st.future.result(timeout=120)
    sched.stop()
    assert [p.steps for p in passes] == [2, 2]


def test_a_session_that_does_not_go_on_holds_the_next_pass_only_briefly(target):
    for s in range(2):
        target.clear(s)
    passes: list[PassStats] = []
    sched = Scheduler(target, on_pass=passes.append, follow_s=0.05, follow_max_s=0.05)
    a, b = Step(0, 0, tokens(3, 0), 1, follows=True), Step(1, 0, tokens(3, 1), 1, follows=True)
    a2 = Step(0, 3, [11], 1, follows=True)
    _follow_up(sched, a, a2, 0.0)               # b's session stops leading: nothing follows it
    sched.submit_many([a, b])
    sched.start()
    a2.future.result(timeout=120)
    sched.stop()
    assert [p.steps for p in passes] == [2, 1]
