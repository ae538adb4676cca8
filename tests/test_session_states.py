"""The verifier's protocol state without a model: a `Session` takes requests, hands out
steps, and is moved on by logits rows; here the rows are made up, so every expectation
follows from the rows each test builds (a row's argmax is the target's choice there).
The session lifecycle (cloud/sessions.py) runs against a stand-in scheduler. Seconds."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future

import numpy as np
import pytest

from cloud.scheduler import no_rows
from cloud.session import BadDraft, Codec, LeadState, Limits, Session
from cloud.sessions import Busy, Full, Registry, SessionState
from kernels import packing
from kernels.sampling import SamplingConfig
from kernels.sparse import SparseDist
from kernels.tree import DraftTree

V = 16
PROMPT = [1, 2, 3]
GREEDY = SamplingConfig()
TOP1 = SamplingConfig(temperature=1.0, top_k=1, seed=5)   # sampled, but p is one-hot at the argmax


def rows(*tops: int) -> np.ndarray:
    """One logits row per entry, each with its argmax at that token."""
    out = np.zeros((len(tops), V), np.float32)
    out[np.arange(len(tops)), tops] = 4.0
    return out


def opened(first: int, sampling=GREEDY, codec=Codec.Q, lead: LeadState | None = None) -> Session:
    """A session after its prompt's pass, whose last row has its argmax at `first`."""
    s = Session("t", 0, sampling, codec, Limits(V, 64, 8, packing.token_width(V)), lead=lead or LeadState())
    step = s.prefill_step(list(PROMPT))
    assert (step.seq, step.start, step.tokens, step.n_logits) == (0, 0, PROMPT, 1)
    s.apply_prefill(rows(first))
    return s


def chain_walk(drafted: list[int], choices: list[int]) -> tuple[int, int]:
    """(accepted, the target's token after them): choices[j] is the target's pick at drafted position j."""
    n = 0
    while n < len(drafted) and drafted[n] == choices[n]:
        n += 1
    return n, choices[n]


def q_for(x: int, other: int) -> SparseDist:
    """A draft distribution that drew x, with some mass on `other`."""
    ids = sorted({x, other})
    return SparseDist(ids, [200 if i == x else 55 for i in ids], 200 + 55 * (len(ids) - 1))


# -- chains ------------------------------------------------------------------------------------
@pytest.mark.parametrize("choices", [[5, 6, 7, 9], [5, 6, 2, 9], [4, 6, 7, 9], [5, 1, 1, 1]])
def test_greedy_block_is_accepted_up_to_the_targets_first_other_choice(choices):
    drafted = [5, 6, 7]
    s = opened(choices[0])
    work = s.verify_step(0, len(PROMPT), drafted, 0, [], [], want_bonus=False)
    # no lag: the prompt's pass already predicted the first drafted position
    assert (work.step.start, work.step.tokens, work.step.n_logits) == (len(PROMPT), drafted, len(drafted))
    v = s.apply_chain(work, rows(*choices[1:]))
    n, nxt = chain_walk(drafted, choices)
    assert (v.accepted, v.overlap) == (n, 0)
    assert s.count.blocks == 1 and s.count.drafted == 3 and s.count.accepted == n
    if n < len(drafted):
        assert v.token == nxt and s.tokens == PROMPT + drafted[:n] + [nxt]
        assert s.epoch == 1 and s.pending is None and s.n_past == len(PROMPT) + n
    else:
        assert v.token is None and s.tokens == PROMPT + drafted and s.epoch == 0
        assert int(np.argmax(s.pending)) == choices[-1] and s.n_past == len(s.tokens)


def test_bonus_token_only_when_asked():
    s = opened(5)
    v = s.apply_chain(s.verify_step(0, 3, [5, 6], 0, [], [], want_bonus=True), rows(6, 11))
    assert (v.accepted, v.token, s.epoch) == (2, 11, 0)
    assert s.tokens == PROMPT + [5, 6, 11] and s.pending is None and s.n_past == 5


def test_rollback_a_rejection_leaves_the_next_pass_starting_inside_the_drafts_it_evaluated():
    s = opened(5)
    s.apply_chain(s.verify_step(0, 3, [5, 6, 7], 0, [], [], want_bonus=False), rows(2, 0, 0))
    assert s.tokens == PROMPT + [5, 2] and s.n_past == 4           # drafts 6, 7 were in the cache too
    work = s.verify_step(1, 5, [8, 9], 0, [], [], want_bonus=False)
    assert work.step.start == 4 < 3 + 3, "the next pass overwrites the rejected drafts"
    assert work.step.tokens == [2, 8, 9] and work.step.n_logits == 3   # the correction goes in as lag
    v = s.apply_chain(work, rows(8, 9, 12))                           # row 0 predicts what follows the correction
    assert (v.accepted, v.token) == (2, None)
    assert s.tokens == PROMPT + [5, 2, 8, 9] and s.n_past == 7 and int(np.argmax(s.pending)) == 12


def test_stale_epoch_is_dropped_and_a_future_one_refused():
    s = opened(4)
    s.apply_chain(s.verify_step(0, 3, [5], 0, [], [], want_bonus=False), rows(0))
    before = (list(s.tokens), s.epoch, s.n_past)
    assert s.verify_step(0, 3, [5, 6], 0, [], [], want_bonus=False) is None
    assert (s.tokens, s.epoch, s.n_past) == before
    with pytest.raises(BadDraft, match="ahead"):
        s.verify_step(2, 4, [5], 0, [], [], want_bonus=False)


def test_block_must_start_where_the_session_is_when_nothing_was_led():
    s = opened(5)
    with pytest.raises(BadDraft, match="expected 3"):
        s.verify_step(0, 2, [3, 5], 0, [], [], want_bonus=False)


# -- sampled chains ------------------------------------------------------------------------------
@pytest.mark.parametrize("other", [2, 3])
def test_codec_q_rejection_draws_the_correction_and_scores_the_sibling(other):
    drafted, choices = [5, 6, 7], [5, 2, 0, 0]             # the target takes 5, then 2 where 6 was drafted
    s = opened(choices[0], sampling=TOP1, codec=Codec.Q)
    qs = [q_for(x, other) for x in drafted]
    v = s.apply_chain(s.verify_step(0, 3, drafted, 0, [], qs, want_bonus=False), rows(*choices[1:]))
    n, target_pick = chain_walk(drafted, choices)       # p is one-hot: p(x) = 0 rejects, p(x) = 1 accepts
    assert v.accepted == n and v.token == target_pick   # the residual of a one-hot p is that p
    # the sibling is q's runner-up (`other`); once 6 is rejected it is taken iff the target wants it
    assert v.sibling_accept == (1.0 if other == target_pick else 0.0)
    assert s.tokens == PROMPT + drafted[:n] + [target_pick] and s.epoch == 1 and s.rejection is None


def test_codec_p_rejection_sends_p_and_the_edge_owes_the_correction():
    s = opened(5, sampling=TOP1, codec=Codec.P, lead=LeadState(on=True, until=100))
    v = s.apply_chain(s.verify_step(0, 3, [5, 6], 0, [200, 200], [], want_bonus=False), rows(9, 0))
    assert (v.accepted, v.token) == (1, None) and v.p_payload
    assert s.rejection.pos == 4 and s.tokens == PROMPT + [5] and s.epoch == 1
    assert not s.can_lead(), "nothing can be led before the edge's correction"
    with pytest.raises(BadDraft, match="must start with the correction"):
        s.verify_step(1, 4, [7], 0, [200], [], want_bonus=False)
    with pytest.raises(BadDraft, match="zero probability"):
        s.verify_step(1, 4, [8, 7], 1, [200], [], want_bonus=False)
    work = s.verify_step(1, 4, [9, 7], 1, [200], [], want_bonus=False)
    assert s.rejection is None and work.step.tokens == [9, 7]     # the correction is lag in the next pass


# -- lazy verdicts (the row cache asks a chain's judge which rows it reads) ----------------------
def rows_read(judge, step_rows: np.ndarray) -> int:
    """How many of a step's rows the judge says its verdict reads (as CachedTarget asks it)."""
    if not judge(-1, None):
        return 0
    for k, row in enumerate(step_rows):
        if not judge(k, row):
            return k + 1
    return len(step_rows)


@pytest.mark.parametrize("sampling,codec", [(GREEDY, Codec.Q), (TOP1, Codec.Q), (TOP1, Codec.P)])
@pytest.mark.parametrize("choices", [[5, 6, 7, 9], [5, 6, 2, 9], [5, 1, 1, 1], [4, 6, 7, 9]])
def test_a_chains_judge_stops_at_the_row_of_its_first_rejection(sampling, codec, choices):
    """The judge reads rows up to the one that rejects, and the verdict reads no row past it:
    rows after it may come back NaN from the cache without changing the verdict."""
    drafted = [5, 6, 7]
    step_rows = rows(*choices[1:])
    q_u8, qs = ([200] * 3, []) if codec == Codec.P else ([], [q_for(x, 2) for x in drafted])
    s = opened(choices[0], sampling=sampling, codec=codec)
    work = s.verify_step(0, len(PROMPT), drafted, 0, q_u8, qs, want_bonus=False)
    n, _ = chain_walk(drafted, choices)
    read = rows_read(work.step.judge, step_rows)
    # no lag: step row k predicts drafted[k + 1]; the rejection at n is read from row n - 1
    assert read == (n if n < len(drafted) else len(step_rows))
    lazy = step_rows.copy()
    lazy[read:] = np.nan
    twin = opened(choices[0], sampling=sampling, codec=codec)
    want = twin.apply_chain(twin.verify_step(0, len(PROMPT), drafted, 0, q_u8, qs, want_bonus=False), step_rows)
    got = s.apply_chain(work, lazy)
    assert (got.accepted, got.token) == (want.accepted, want.token) and s.tokens == twin.tokens


def test_a_verdict_that_would_read_a_skipped_row_fails_loudly():
    s = opened(5)
    work = s.verify_step(0, len(PROMPT), [5, 6], 0, [], [], want_bonus=False)
    lazy = rows(6, 9)
    lazy[0] = np.nan                           # the row that accepts 6 was (wrongly) skipped
    with pytest.raises(RuntimeError, match="never computed"):
        s.apply_chain(work, lazy)


# -- lead tokens ---------------------------------------------------------------------------------
def lead_one(s: Session) -> int:
    work = s.lead_step()
    assert work.step.tokens == [], "the prompt's pass already predicted the lead position"
    v = s.apply_lead(work, no_rows(V))
    assert v.lead and v.start == len(PROMPT)
    return v.token


def test_block_overlapping_a_lead_token_is_verified_past_it():
    s = opened(5, lead=LeadState(on=True, until=100))
    assert s.can_lead() and lead_one(s) == 5 and s.tokens == PROMPT + [5]
    work = s.verify_step(0, 3, [5, 6, 7], 0, [], [], want_bonus=False)   # sent before the edge saw 5
    assert work.step.tokens == [5, 6, 7] and work.step.n_logits == 3      # the lead token is lag
    v = s.apply_chain(work, rows(6, 8, 0))
    n, _ = chain_walk([6, 7], [6, 8])
    assert (v.overlap, v.accepted) == (1, 1 + n) and s.tokens == PROMPT + [5, 6, 8]


def test_block_that_contradicts_a_lead_token_is_dropped_and_breaks_the_branch():
    s = opened(5, lead=LeadState(on=True, until=100))
    lead_one(s)
    s.lead.awaiting = False
    assert s.verify_step(0, 3, [4, 6], 0, [], [], want_bonus=False) is None
    assert s.epoch == 1 and s.lead.awaiting and s.tokens == PROMPT + [5]


def test_block_wholly_decided_by_lead_tokens_needs_no_pass():
    s = opened(5, lead=LeadState(on=True, until=100))
    lead_one(s)
    assert s.verify_step(0, 3, [5], 0, [], [], want_bonus=False) is None
    assert s.epoch == 0 and not s.lead.awaiting, "the branch lives: its next block is due"


def test_lead_stops_at_the_requested_length():
    s = opened(5, lead=LeadState(on=True, until=len(PROMPT) + 1))
    lead_one(s)
    assert not s.can_lead()


# -- trees ---------------------------------------------------------------------------------------
def tree_walk(tree: DraftTree, choice: dict[int, int]) -> tuple[list[int], int]:
    """Greedy tree acceptance from the target's pick after each node (-1: the root)."""
    path, node = [], -1
    while True:
        nxt = next((c for c in tree.children(node) if tree.tokens[c] == choice[node]), None)
        if nxt is None:
            return path, choice[node]
        path.append(nxt)
        node = nxt


@pytest.mark.parametrize("root, after5, after6, after9", [(9, 0, 0, 4), (5, 6, 8, 0), (5, 3, 0, 0)])
def test_greedy_tree_takes_the_longest_path_the_target_agrees_with(root, after5, after6, after9):
    tree = DraftTree((5, 6, 9), (-1, 0, -1))            # main chain 5-6, sibling 9 at the first level
    s = opened(root)
    work = s.verify_tree_step(0, 3, tree, [], want_bonus=False, scratch=[10])
    own, branch = work.steps
    assert (own.seq, own.start, own.tokens) == (0, 3, [5, 6])
    assert (branch.seq, branch.start, branch.tokens, branch.copy_from, branch.after) == (10, 3, [9], 0, own)
    v = s.apply_tree(work, [rows(after5, after6), rows(after9)])
    path, token = tree_walk(tree, {-1: root, 0: after5, 1: after6, 2: after9})
    full = path == [0, 1]
    assert v.accepted == len(path) and v.path == [tree.children(tree.parents[i]).index(i) for i in path]
    assert v.token == (None if full else token)
    assert s.tokens == PROMPT + [tree.tokens[i] for i in path] + ([] if full else [token])
    assert s.epoch == (0 if full else 1)
    on_main = len([i for i in path if i in (0, 1)])
    assert s.n_past == 3 + on_main, "only the main chain's accepted part is in the session's cache"


def test_tree_refused_without_scratch_sequences_and_for_codec_p_sampled():
    tree = DraftTree((5, 9), (-1, -1))
    with pytest.raises(BadDraft, match="tree-seqs 0"):
        opened(5).verify_tree_step(0, 3, tree, [], want_bonus=False, scratch=[])
    with pytest.raises(BadDraft, match="codec P cannot carry"):
        opened(5, sampling=TOP1, codec=Codec.P).verify_tree_step(0, 3, tree, [None, None], False, scratch=[10])


# -- lifecycle -----------------------------------------------------------------------------------
class StandIn:
    """The scheduler's part in freeing a sequence: drop its queued steps, run a chore."""

    def __init__(self):
        self.dropped: list[int] = []

    def drop(self, seq: int) -> None:
        self.dropped.append(seq)

    def run_now(self, fn) -> Future:
        f: Future = Future()
        f.set_result(fn())
        return f


def registry(n_seqs: int = 1):
    cleared: list[int] = []
    return Registry(n_seqs, StandIn(), cleared.append), cleared


def make(sid: str):
    return lambda seq: Session(sid, seq, GREEDY, Codec.P, Limits(V, 64, 8, 2))


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_lifecycle_open_attach_detach_frees_the_sequence():
    async def go():
        reg, cleared = registry()
        a = await reg.open(make("a"))
        assert reg.state(a) is SessionState.PREFILLING
        with pytest.raises(Busy):
            reg.attach(a)                                # Open is still prefilling it
        assert reg.opened(a) and reg.state(a) is SessionState.IDLE
        reg.attach(a)
        assert reg.state(a) is SessionState.STREAMING
        with pytest.raises(Busy):
            reg.attach(a)                                # one stream at a time
        with pytest.raises(Full):
            await reg.open(make("b"))
        assert reg.detach(a) and reg.state(a) is SessionState.CLOSED and reg.get("a") is None
        await settle()
        assert cleared == [a.seq]
        b = await reg.open(make("b"))
        assert b.seq == a.seq and not reg.detach(a), "a session ends once"
    asyncio.run(go())


def test_a_new_session_takes_the_lowest_free_sequence():
    """A pass's attention spans the KV streams from its lowest sequence to its highest: live
    sessions stay packed at the low end whatever order the earlier ones ended in (measured:
    8 streams spread over sequences 0-11 ran their passes at up to 2.5x the time)."""
    async def go():
        reg, _ = registry(6)
        held = [await reg.open(make(f"s{i}")) for i in range(4)]
        assert [s.seq for s in held] == [0, 1, 2, 3]
        for s in (held[3], held[0], held[2]):
            reg.detach(s)
        await settle()
        again = [await reg.open(make(f"t{i}")) for i in range(4)]
        assert [s.seq for s in again] == [0, 2, 3, 4]
    asyncio.run(go())


def test_close_during_a_stream_tells_it_and_frees_the_sequence_once_it_detaches():
    async def go():
        reg, cleared = registry()
        a = await reg.open(make("a"))
        reg.opened(a)
        told = []
        reg.attach(a, on_close=lambda: told.append(True))
        assert not reg.close(a), "not freed under a live stream"
        assert told == [True] and reg.closing(a) and reg.get("a") is a
        await settle()
        assert cleared == []
        assert not reg.close(a) and told == [True], "a second Close changes nothing"
        with pytest.raises(Busy):
            reg.attach(a)
        reg.detach(a)
        await settle()
        assert cleared == [a.seq] and reg.state(a) is SessionState.CLOSED
    asyncio.run(go())


def test_close_of_an_idle_session_frees_it_at_once():
    async def go():
        reg, cleared = registry()
        a = await reg.open(make("a"))
        reg.opened(a)
        assert reg.close(a) and reg.get("a") is None
        await settle()
        assert cleared == [a.seq]
    asyncio.run(go())


def test_close_during_open_ends_the_session_when_the_prefill_is_done():
    async def go():
        reg, cleared = registry()
        a = await reg.open(make("a"))
        assert not reg.close(a) and reg.closing(a)
        assert not reg.opened(a) and reg.get("a") is None
        await settle()
        assert cleared == [a.seq]
    asyncio.run(go())


def test_only_idle_sessions_expire():
    async def go():
        reg, _ = registry(n_seqs=3)
        idle, streaming, prefilling = [await reg.open(make(n)) for n in "abc"]
        reg.opened(idle)
        reg.opened(streaming)
        reg.attach(streaming)
        assert reg.expire(10.0) == [], "nothing has been idle that long"
        assert reg.expire(10.0, now=time.monotonic() + 11.0) == [idle]
        assert reg.get("a") is None and reg.get("b") is streaming and reg.get("c") is prefilling
    asyncio.run(go())


def test_open_waits_for_a_sequence_being_freed():
    async def go():
        reg, _ = registry()
        a = await reg.open(make("a"))
        reg.opened(a)
        reg.close(a)                                     # freed on the model's thread a moment later
        b = await asyncio.wait_for(reg.open(make("b")), 1.0)
        assert b.seq == a.seq
    asyncio.run(go())


# -- the inbox: what a session takes next, with or without waiting ------------------------------
def _draft(epoch: int, start: int, toks: list[int]):
    from proto import tandem_pb2 as pb
    return pb.Draft(epoch=epoch, start=start, tokens=packing.pack_tokens(toks, packing.token_width(V)))


def _inbox_after(items: list, ends: bool = False):
    """An Inbox whose stream delivers `items`, then stays open (or ends); run inside a loop."""
    from cloud.inbox import Inbox

    async def stream():
        for it in items:
            yield it
        if not ends:
            await asyncio.Event().wait()          # the edge keeps its side open
    return Inbox(stream(), packing.token_width(V), max_draft=8)


def test_inbox_ready_takes_queued_blocks_merged_and_never_waits():
    from cloud.inbox import LEAD

    async def go():
        s = opened(5)                             # lead off: a session that only verifies
        inbox = _inbox_after([_draft(0, 3, [5, 6]), _draft(0, 5, [7])])
        assert inbox.ready(s) is None, "nothing has arrived yet, and ready() does not wait"
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert inbox.due(s), "a block of the session's epoch is queued"
        t, group = inbox.ready(s)
        assert [(d.start, len(d.tokens)) for d in group] == [(3, 2 * packing.token_width(V)), (5, packing.token_width(V))]
        assert inbox.ready(s) is None and not inbox.due(s)
        led = opened(5, lead=LeadState(on=True, until=100))
        assert inbox.due(led) and inbox.ready(led)[1] is LEAD, "a session awaiting its branch leads at once"
        inbox.close()
    asyncio.run(go())


def test_inbox_due_ignores_blocks_of_an_old_epoch_and_the_stream_end():
    from cloud.inbox import END

    async def go():
        s = opened(5)
        s.epoch = 2                               # two breaks since: epoch 1's blocks are dropped unverified
        inbox = _inbox_after([_draft(1, 3, [5])], ends=True)
        for _ in range(3):
            await asyncio.sleep(0)
        assert not inbox.due(s)
        got = inbox.ready(s)
        assert got is not None and got[1][0].epoch == 1, "the stale block comes first (it is dropped later)"
        assert inbox.ready(s) is None, "the stream's end is left to next()"
        assert (await inbox.next(s))[1] is END
        inbox.close()
    asyncio.run(go())


def test_inbox_block_due_waits_for_a_block_of_the_sessions_epoch():
    """What a waiting lead listens for: a stale block does not end the wait, the live branch's does."""
    async def go():
        s = opened(5, lead=LeadState(on=True, until=100))
        s.epoch = 1
        feed: asyncio.Queue = asyncio.Queue()

        async def stream():
            while True:
                yield await feed.get()
        from cloud.inbox import Inbox
        inbox = Inbox(stream(), packing.token_width(V), max_draft=8)
        waiting = asyncio.ensure_future(inbox.block_due(s))
        await feed.put(_draft(0, 3, [5]))            # the old branch's block
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()
        await feed.put(_draft(1, 3, [5, 6]))
        await asyncio.wait_for(waiting, 5)
        inbox.close()
    asyncio.run(go())
