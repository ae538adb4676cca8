"""Row caches of the emulated target and drafter: the same rows, the same text, less CPU.

The references are the same models without a cache on this build: a cached row must be
bit-identical to the one the model computes, however the pass that asks for it is made
up (prefill chunks, blocks, rollbacks, tree branches, a sequence whose real cells lag
behind because every earlier row was a hit)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cloud.target import Chunk, Target
from cloud.target_cache import CachedTarget
from common.rowstore import PrefixKeys, RowStore, RowStoreError

TREE_SEQ = 3          # a scratch sequence, as the verifier keeps after its sessions' ones


@pytest.fixture(scope="module")
def model_path():
    from edge.model_files import shipped_gguf
    return shipped_gguf()


@pytest.fixture(scope="module")
def identity(model_path):
    from common.rowstore import model_identity
    return model_identity(model_path, "target", test=True)


@pytest.fixture(scope="module")
def plain(model_path):
    t = Target(model_path, n_seqs=4, n_threads=1)
    yield t
    t.close()


@pytest.fixture(scope="module")
def raw(model_path):
    """The model a CachedTarget wraps (its own context: the cache tracks what its cells hold)."""
    t = Target(model_path, n_seqs=4, n_threads=1)
    yield t
    t.close()


def script(prompt: list[int], tail: list[int]) -> list[list[Chunk]]:
    """What a verifier's passes do to its sequences: a chunked prefill, blocks, a rollback, a
    tree branch copied from the session, a second session beside it."""
    return [
        [Chunk(0, 0, prompt[:32], 0), Chunk(1, 0, prompt[:20], 1)],
        [Chunk(0, 32, prompt[32:], 1), Chunk(1, 20, [11, 12, 13], 3)],
        [Chunk(0, len(prompt), [5, 6, 7, 8], 4)],
        [Chunk(0, len(prompt) + 2, [9, 10], 2)],                                 # a rollback of two
        [Chunk(0, len(prompt) + 4, tail[:3], 3)],
        [Chunk(TREE_SEQ, len(prompt) + 5, [300, 301], 2, copy_from=0)],          # a branch off the chain
        [Chunk(0, len(prompt) + 7, tail[3:], len(tail) - 3), Chunk(1, 22, [14], 1)],
    ]


def run(target, passes: list[list[Chunk]]) -> list[np.ndarray]:
    out = []
    for chunks in passes:
        out += [r.copy() for r in target.decode(chunks)]
    for seq in range(target.n_seqs):
        target.clear(seq)
    return out


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape, f"chunk {i}: {x.shape} against {y.shape}"
        assert np.array_equal(x, y), f"chunk {i}: rows differ by up to {np.abs(x - y).max()}"


PROMPT = [int(x) for x in np.random.default_rng(3).integers(100, 20000, 45)]


def test_rows_are_the_targets_and_a_second_run_decodes_nothing(plain, raw, identity, tmp_path):
    passes = script(PROMPT, [40, 41, 42, 43, 44])
    want = run(plain, passes)
    cached = CachedTarget(raw, RowStore(tmp_path, identity, raw.n_vocab))
    assert_same(run(cached, passes), want)
    rows = sum(c.n_logits for p in passes for c in p)
    assert cached.cache_counts() == (0, rows) and cached.real_passes > 0
    decodes = cached.real_passes
    assert_same(run(cached, passes), want)
    assert cached.cache_counts() == (rows, rows), "every row of the second run came from the store"
    assert cached.real_passes == decodes, "a pass whose rows are all stored decodes nothing"


def test_a_miss_after_hits_catches_up_the_lagging_cells(plain, raw, identity, tmp_path):
    """A fresh verifier on a warm store: the first passes are hits, so its cells hold nothing;
    a tail it has not seen (and a branch off it) must still give the model's own rows."""
    warm = CachedTarget(raw, RowStore(tmp_path, identity, raw.n_vocab))
    run(warm, script(PROMPT, [40, 41, 42, 43, 44]))
    warm.store.close()
    passes = script(PROMPT, [40, 41, 42, 900, 901, 902])      # the same until the tail's fourth token
    passes.append([Chunk(TREE_SEQ, len(PROMPT) + 8, [77, 78], 2, copy_from=0)])
    want = run(plain, passes)
    cached = CachedTarget(raw, RowStore(tmp_path, identity, raw.n_vocab))
    got = run(cached, passes)
    assert_same(got, want)
    hits, misses = cached.cache_counts()
    assert hits > 0 and misses == 3 + 2, (hits, misses)     # the new tail's rows, the new branch's


def test_a_rollback_served_from_the_store_is_not_copied_from_stale_cells(plain, raw, identity, tmp_path):
    """Cells evaluated past a rollback hold the old tokens; a branch copied from that sequence
    must not take them for the new ones the store served."""
    n = len(PROMPT)
    warm = CachedTarget(raw, RowStore(tmp_path, identity, raw.n_vocab))
    run(warm, [[Chunk(0, 0, PROMPT, 1)], [Chunk(0, n, [5, 6, 9, 10], 4)]])
    warm.store.close()
    passes = [[Chunk(0, 0, PROMPT, 1)],
              [Chunk(0, n, [5, 6, 7, 8], 4)],                   # new rows: its cells now hold 5 6 7 8
              [Chunk(0, n + 2, [9, 10], 2)],                    # rolled back, both rows from the store
              [Chunk(TREE_SEQ, n + 3, [300], 1, copy_from=0)]]  # a branch after 5 6 9, missing
    want = run(plain, passes)
    cached = CachedTarget(raw, RowStore(tmp_path, identity, raw.n_vocab))
    assert_same(run(cached, passes), want)
    assert cached.cache_counts()[1] == 2 + 1


def test_store_keeps_rows_across_opens_and_cuts_a_torn_tail(identity, tmp_path):
    keys = PrefixKeys(RowStore(tmp_path, identity, 8).root)
    keys.extend([1, 2, 3])
    s = RowStore(tmp_path, identity, 8)
    for i in range(3):
        s.put(keys.key(i), np.full(8, i, np.float32))
    s.close()
    with open(s.dir / "rows.f32", "ab") as f:        # a process killed between a row and its key
        f.write(b"\0" * 12)
    s = RowStore(tmp_path, identity, 8)
    assert len(s) == 3 and np.array_equal(s.get(keys.key(2)), np.full(8, 2, np.float32))
    assert os.path.getsize(s.dir / "rows.f32") == 3 * 8 * 4
    other = PrefixKeys(s.root)
    other.extend([1, 2, 4])
    assert other.common(keys, 3) == 2 and s.get(other.key(2)) is None
    reader = RowStore(tmp_path, identity, 8)         # while s writes: reads, adds nothing
    assert not reader.writable and len(reader) == 3
    reader.put(other.key(2), np.zeros(8, np.float32))
    assert len(reader) == 3
    reader.close()
    s.close()


def test_a_cache_dir_of_another_model_is_refused_or_kept_apart(identity, tmp_path):
    a = RowStore(tmp_path, identity, 8)
    b = RowStore(tmp_path, {**identity, "sha256": "0" * 64}, 8)
    assert a.dir != b.dir and a.root != b.root, "each model has its own store and keys"
    a.close()
    b.close()
    with pytest.raises(RowStoreError, match="pass the directory above it"):
        RowStore(a.dir, identity, 8)
    meta = json.loads((a.dir / "meta.json").read_text())
    meta["identity"]["llama_cpp"] = "0.0.1"
    (a.dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RowStoreError, match="llama_cpp"):
        RowStore(tmp_path, identity, 8)
    with pytest.raises(RowStoreError, match="not a directory"):
        RowStore(a.dir / "meta.json", identity, 8)


# -- the drafter's cache (edge/draft_cache.py) ------------------------------------------

@pytest.fixture(scope="module")
def draft_path():
    from edge.derive import DEFAULT_DRAFT, ensure
    return ensure(DEFAULT_DRAFT, quiet=True)


@pytest.fixture(scope="module")
def draft_pair(draft_path):
    """(the drafter alone, the model a CachedDrafter wraps): two instances of one GGUF."""
    from edge.llama_model import LlamaDrafter
    a, b = LlamaDrafter(draft_path, n_threads=1), LlamaDrafter(draft_path, n_threads=1)
    yield a, b
    a.close()
    b.close()


def draft_script(tail: list[int]) -> list[tuple]:
    """What the speculative loop does to a drafter: a prefill, one-token draft steps, a probe
    rolled back, a rejection's rollback, a correction with lead tokens, a second request that
    shares part of the prompt."""
    p = PROMPT
    ops = [("prefill", p), ("eval", [7]), ("truncate", len(p))]
    ops += [("eval", [t]) for t in (11, 12, 13, 14, 15)]
    ops += [("truncate", len(p) + 2), ("eval", [21, 22, 23])]
    ops += [("eval", [t]) for t in tail]
    ops += [("prefill", p[:30] + [5, 6, 7])] + [("eval", [t]) for t in tail[:3]]
    return ops


def run_drafter(d, ops) -> list[np.ndarray]:
    rows = []
    for op, arg in ops:
        if op == "truncate":
            d.truncate(arg)
        else:
            rows.append(getattr(d, op)(arg).copy())
    return rows


@pytest.mark.parametrize("background", [False, True], ids=["at-misses", "behind-hits"])
def test_drafter_rows_are_the_models_when_a_miss_follows_hits(draft_pair, draft_path, tmp_path, background):
    """A warm store serves the shared start without touching the model; the new tail's misses
    make it catch up (the prompt replayed whole, draft steps merged) to the very same rows,
    whether the background thread caught up behind the hits or the misses did it all (the
    two race here: rows must not depend on who wins)."""
    from edge.draft_cache import CachedDrafter
    from edge.llama_model import LlamaDrafter
    from common.rowstore import RowStore, model_identity
    plain, inner = draft_pair
    store = lambda: RowStore(tmp_path, model_identity(draft_path, "drafter", **LlamaDrafter.ROW_SETTINGS),  # noqa: E731
                             inner.n_vocab)
    first = draft_script([30, 31, 32, 33])
    cold = CachedDrafter(inner, store(), background=background)
    assert_same(run_drafter(cold, first), run_drafter(plain, first))
    assert cold.hits == 0
    cold.store.close()
    second = draft_script([30, 31, 900, 901])
    warm = CachedDrafter(inner, store(), background=background)
    assert_same(run_drafter(warm, second), run_drafter(plain, second))
    assert warm.hits > 0 and warm.misses == 2 + 1, (warm.hits, warm.misses)
    warm.store.close()


def test_the_model_follows_hits_so_a_miss_evaluates_only_its_own_token(draft_pair, draft_path, tmp_path):
    """Behind a warm prompt and draft steps, the background thread replays them; a miss that
    comes once it is done evaluates its one new token, not the whole prefix."""
    from edge.draft_cache import CachedDrafter
    from edge.llama_model import LlamaDrafter
    from common.rowstore import RowStore, model_identity
    plain, inner = draft_pair
    identity = model_identity(draft_path, "drafter", **LlamaDrafter.ROW_SETTINGS)
    warm_up = [("prefill", PROMPT)] + [("eval", [t]) for t in (40, 41, 42)]
    cold = CachedDrafter(inner, RowStore(tmp_path, identity, inner.n_vocab), background=False)
    run_drafter(cold, warm_up)
    cold.store.close()
    d = CachedDrafter(inner, RowStore(tmp_path, identity, inner.n_vocab))
    try:
        hits = run_drafter(d, warm_up)
        assert d.hits == 4 and d.misses == 0
        assert d.wait_idle(), "the background thread caught up"
        assert d.background[0] == len(PROMPT) + 3 and d.caught_up[0] == 0
        row = d.eval([950])
        assert d.misses == 1 and d.caught_up[0] == 1
        assert_same(hits + [row], run_drafter(plain, warm_up + [("eval", [950])]))
        stats = d.stats()
        assert stats["draft_cache_background_tokens"] == len(PROMPT) + 3
        assert stats["draft_cache_caught_up_tokens"] == 1
    finally:
        d.stop()                               # the model is the module's: left open
        d.store.close()


def test_rows_after_the_first_rejection_are_neither_fetched_nor_computed(plain, raw, identity, tmp_path):
    """A judged chunk (a greedy verdict) stops at the row that rejects its drafted token: the
    rows after it, never stored, cost no catch-up, and the rows up to it are the model's."""
    n = len(PROMPT)
    warm = CachedTarget(raw, RowStore(tmp_path, identity, raw.n_vocab))
    run(warm, [[Chunk(0, 0, PROMPT, 1)], [Chunk(0, n, [5, 6], 2)]])        # rows after 5 and after 5 6
    warm.store.close()
    block = [5, 6, 7, 8]                       # rows after 7 and 8 were never computed
    want = run(plain, [[Chunk(0, 0, PROMPT, 1)], [Chunk(0, n, block, 4)]])
    seen = []

    def rejects_second(k, row):                # row 1 (after 5 6) rejects the draft it predicts
        seen.append(k)
        return k < 1

    cached = CachedTarget(raw, RowStore(tmp_path, identity, raw.n_vocab))
    cached.decode([Chunk(0, 0, PROMPT, 1)])
    passes0 = cached.real_passes
    got = cached.decode([Chunk(0, n, block, 4, judge=rejects_second)])[0]
    assert seen == [-1, 0, 1]
    assert np.array_equal(got[:2], want[1][:2]) and np.isnan(got[2:]).all()
    assert cached.real_passes == passes0 and cached.skipped == 2 and cached.misses == 0
    # a judge that needs every row still gets the model's rows, the missing ones computed
    all_rows = cached.decode([Chunk(0, n, block, 4, judge=lambda k, row: True)])[0]
    assert np.array_equal(all_rows, want[1]) and cached.misses == 2
    for seq in range(raw.n_seqs):
        cached.clear(seq)


def test_a_judge_that_needs_no_row_skips_the_whole_chunk(raw, identity, tmp_path):
    cached = CachedTarget(raw, RowStore(tmp_path, identity, raw.n_vocab))
    rows = cached.decode([Chunk(0, 0, PROMPT, 3, judge=lambda k, row: False)])[0]
    assert rows.shape == (3, raw.n_vocab) and np.isnan(rows).all()
    assert cached.cache_counts() == (0, 0) and cached.skipped == 3 and cached.real_passes == 0
    assert cached.seq_len(0) == len(PROMPT)     # the tokens are in the sequence all the same
    cached.clear(0)
