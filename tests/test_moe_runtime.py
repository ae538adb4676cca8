"""Expert store, cache, policies and the MoE drafter on a tiny random MoE."""
import numpy as np
import pytest
import torch

from edge.model_files import shipped_gguf
from edge.moe.drafter import MoEDrafter, MoEDrafterConfig
from edge.moe.gguf_loader import GGUFModel
from edge.moe.gguf_writer import MoESpec, random_moe, write_moe
from edge.moe.model import MoETransformer
from edge.moe.policy import PolicyConfig, default_floors, expert_requirements
from edge.moe.sensitivity import floors_from_kl, tolerance
from edge.moe.runtime import BudgetTooSmall, OffloadedExperts
from edge.moe.store import ExpertStore, StorageProfile, StoreConfig, flash_copy, working_copy


SPEC = MoESpec("llama", 3, 64, 4, 2, 16, 8, 64, [2, 2, 2])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("rt") / "tiny.gguf"
    return write_moe(p, SPEC, random_moe(SPEC, 49152, seed=3), shipped_gguf())


@pytest.fixture(scope="module")
def ref(tiny):
    """Logits of resident-fp, the quality reference, computed once."""
    return run_policy(tiny, "resident-fp", 100)[0]


def run_policy(path, policy, pct, storage="none", n=12):
    d = MoEDrafter(MoEDrafterConfig(model=path, policy=policy, budget_pct=pct, storage=storage,
                                    max_ctx=64))
    torch.manual_seed(0)
    toks = torch.randint(0, 49152, (n,)).tolist()
    out = [d.eval(toks[:4])] + [d.eval([t]) for t in toks[4:]]
    stats = d.stats()
    d.close()
    return np.stack(out), stats


def test_resident_fp_equals_reference_model(tiny, ref):
    out = ref
    gm = GGUFModel(tiny)
    torch.manual_seed(0)
    toks = torch.randint(0, 49152, (12,))
    want = MoETransformer(gm, max_ctx=64, dtype=MoEDrafterConfig(model=tiny).dtype).forward(toks)[3:].numpy()
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)


def test_half_weights_are_exact_and_track_float32(tiny, tmp_path):
    """Half keeps every weight of an F16 file bit-exact; only activations are
    rounded at single-token products, so logits stay close to float32's."""
    path = write_moe(tmp_path / "tiny-f16.gguf", SPEC, random_moe(SPEC, 49152, seed=3), shipped_gguf(),
                     dtype=np.float16)
    gm = GGUFModel(path)
    full = MoETransformer(gm, max_ctx=64)
    half = MoETransformer(gm, max_ctx=64, dtype=torch.float16)
    for a, b in zip(full.layers, half.layers):
        assert b.wqkv.dtype == torch.float16 and torch.equal(b.wqkv.float(), a.wqkv)
    for layer in gm.cfg.moe_layers:
        assert half.experts.gate_up[layer].dtype == torch.float16
        assert torch.equal(half.experts.gate_up[layer].float(), full.experts.gate_up[layer])
    # A float32 file's weights are not all float16 values: they stay float32.
    assert MoETransformer(GGUFModel(tiny), max_ctx=8, dtype=torch.float16).layers[0].wo.dtype == torch.float32
    torch.manual_seed(1)
    toks = torch.randint(0, 49152, (16,))
    ref = full.forward(toks)
    prompt = half.forward(toks[:8])                      # rows > HALF_MAX_ROWS: float32 products
    steps = torch.cat([half.forward(toks[i:i + 1]) for i in range(8, 16)])
    got = torch.cat([prompt, steps])
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert rel < 2e-2, rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    # The store's copies follow the same rule (decided by the file's type, not compared).
    for tensors, f32 in ((path, False), (tiny, True)):
        store = ExpertStore(GGUFModel(tensors), StoreConfig(StorageProfile.from_name("none"), dtype=torch.float16))
        gate_up, down = store.resident_copy(0, 1, 16).gate_up, store.resident_copy(0, 1, 4).down
        assert gate_up.dtype == (torch.float32 if f32 else torch.float16) and down.dtype == torch.float16
    ours = MoETransformer(gm, max_ctx=8, dtype=torch.float16).experts.gate_up[0][1]
    assert torch.equal(ExpertStore(gm, StoreConfig(StorageProfile.from_name("none"), dtype=torch.float16))
                       .resident_copy(0, 1, 16).gate_up, ours)


def test_half_offloaded_lossless_policy_is_bit_identical_to_resident(tmp_path):
    """Experts are summed in the reference's order whichever arrived first, so an
    on-demand policy reading the same weights gives the very same logits."""
    # Four and eight experts a token: with two, either order gives the same sum.
    spec = MoESpec("llama", 3, 64, 4, 2, 16, 8, 64, [8, 4, 4])
    path = write_moe(tmp_path / "f16.gguf", spec, random_moe(spec, 49152, seed=3), shipped_gguf(),
                     dtype=np.float16)
    torch.manual_seed(2)
    toks = torch.randint(0, 49152, (24,)).tolist()

    def logits(policy, pct):
        d = MoEDrafter(MoEDrafterConfig(model=path, policy=policy, budget_pct=pct, max_ctx=64))
        out = [d.eval(toks[:16])] + [d.eval([t]) for t in toks[16:]]     # a prompt, then single tokens
        stats = d.stats()
        d.close()
        return np.stack(out), stats

    resident, _ = logits("resident-fp", 100)
    lru, st = logits("lru-fp", 50)
    assert st["total"]["misses"] > 0
    assert np.array_equal(lru, resident)


def test_lru_fp_under_small_budget_is_exact_but_misses(tiny, ref):
    out, st = run_policy(tiny, "lru-fp", 30)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert st["total"]["misses"] > 0 and st["total"]["bytes_read"] > 0
    assert set(st["layers"][0]) >= {"hit_rate", "prefetch_recall", "bytes_read", "stall_s",
                                    "precision_mix"}


def test_dymoe_with_prefetch_prefetches_and_mixes_precision(tiny, ref):
    out, st = run_policy(tiny, "dymoe-with-prefetch", 25)
    mix = st["total"]["precision_mix"]
    assert set(mix) <= {"int2", "int4", "int8"} and "int4" in mix
    assert st["total"]["prefetch_recall"] is not None
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.5


def test_storage_model_makes_reads_cost_time(tiny):
    gm = GGUFModel(tiny)
    store = ExpertStore(gm, StoreConfig(StorageProfile.from_name("sd-card")))
    _, busy = store.read(0, 0, 16)
    expect = StorageProfile.from_name("sd-card").read_seconds(gm.expert_nbytes(0))
    assert busy >= expect * 0.95


def test_budget_below_one_token_is_a_clear_error(tiny):
    gm = GGUFModel(tiny)
    store = ExpertStore(gm, StoreConfig(StorageProfile.from_name("none")))
    with pytest.raises(BudgetTooSmall, match="below what one token needs"):
        OffloadedExperts(gm, store, PolicyConfig.from_name("lru-fp"), 1000)
    with pytest.raises(ValueError, match="unknown storage profile"):
        StorageProfile.from_name("floppy")
    with pytest.raises(ValueError, match="unknown MoE policy"):
        PolicyConfig.from_name("magic")


@pytest.mark.parametrize("half", [False, True])
def test_drafter_rollback_reproduces_logits(tiny, tmp_path, half):
    # Half rounds activations in few-row products only, so a position's
    # logits depend on how it was chunked: compare like with like there.
    model = tiny if not half else write_moe(tmp_path / "f16.gguf", SPEC, random_moe(SPEC, 49152, seed=3),
                                             shipped_gguf(), dtype=np.float16)
    # A budget every expert fits in at its precision (the F16 file's full-precision bytes are half
    # the F32 file's): no read, so no prefetch timing can change which copy a pass uses.
    d = MoEDrafter(MoEDrafterConfig(model=model, policy="dymoe", budget_pct=100 if half else 50, max_ctx=64,
                                    half=half))
    a = d.eval([1, 2, 3, 4, 5])
    b0 = d.eval([6, 7])
    d.truncate(5)
    assert d.n_past == 5
    b = d.eval([6, 7])
    assert d.stats()["total"]["misses"] == 0
    if half:
        np.testing.assert_allclose(b, b0, atol=1e-5)
        d.close()
        return
    d.truncate(4)
    c = d.eval([5])
    np.testing.assert_allclose(a, c, atol=1e-5)
    assert b.shape == (d.n_vocab,) and b.dtype == np.float32
    d.close()


def test_floors_follow_measured_kl_with_a_noise_floor():
    kl = {8: {1: 0.02, 2: 0.01, 3: 0.03}, 4: {1: 0.05, 2: 0.2, 3: 0.02}, 2: {1: 0.5, 2: 0.9, 3: 0.05}}
    tol = tolerance(kl, kl_tol=0.01, noise_factor=3.0)       # 3 x median int8 KL
    assert tol == pytest.approx(0.06)
    assert floors_from_kl(kl, tol) == {1: 4, 2: 8, 3: 2}
    assert floors_from_kl(kl, 0.001) == {1: 16, 2: 16, 3: 16}   # too sensitive for int8
    assert floors_from_kl(kl, 0.001, max_floor=8) == {1: 8, 2: 8, 3: 8}


def test_default_floors_protect_first_last_and_dense_layers():
    assert default_floors([0, 1, 2, 3], [8, 4, 4, 4], 8) == {0: 8, 1: 4, 2: 4, 3: 8}


def test_dymoe_precision_by_importance_floor_and_prefill():
    p = PolicyConfig.from_name("dymoe-with-importance", {1: 2, 2: 4, 3: 8, 4: 16})
    sel = torch.tensor([[0, 1, 2, 3]])
    imp = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    # The top expert (>= half the mass) runs above the floor, the tail at it.
    assert expert_requirements(p, 1, sel, imp) == {1: 8, 2: 2, 0: 2, 3: 2}
    assert expert_requirements(p, 2, sel, imp) == {1: 8, 2: 4, 0: 4, 3: 4}
    assert expert_requirements(p, 3, sel, imp) == {1: 16, 2: 8, 0: 8, 3: 8}
    assert set(expert_requirements(p, 4, sel, imp).values()) == {16}
    # A prompt reads every expert it needs once, at the layer's low precision.
    assert expert_requirements(p, 1, sel.repeat(3, 1), imp.repeat(3, 1)) == {0: 2, 1: 2, 2: 2, 3: 2}
    # Without importance every expert runs at the layer's floor.
    assert PolicyConfig.from_name("dymoe-no-importance", {2: 4}).required_bits(2, 0, 0.0) == 4


def test_low_bit_image_is_written_once_and_read_back(tiny):
    gm = GGUFModel(tiny)
    store = ExpertStore(gm, StoreConfig(StorageProfile.from_name("none")))
    store.prepare([4])
    path = store.image_path(4)
    mtime = path.stat().st_mtime_ns
    again = ExpertStore(gm, StoreConfig(StorageProfile.from_name("none")))
    again.prepare([4])
    assert path.stat().st_mtime_ns == mtime
    w, _ = again.read(1, 3, 4)
    fp = store.resident_copy(1, 3, 16)
    torch.testing.assert_close(w.down, working_copy(flash_copy(fp.down, 4, 32)))
    assert w.nbytes == store.nbytes(1, 4) < fp.nbytes / 3


def test_sensitivity_probe_measures_every_layer(tiny):
    from edge.moe.sensitivity import SensitivityConfig, measure
    gm = GGUFModel(tiny)
    toks = torch.randint(0, 49152, (20,), generator=torch.Generator().manual_seed(5))
    full, cap = MoETransformer(gm, max_ctx=32), []
    ref = full.forward(toks)
    MoETransformer(gm, max_ctx=32).forward_from(0, full.embed(toks), cap)
    # Re-running from a captured residual equals the whole forward pass.
    torch.testing.assert_close(MoETransformer(gm, max_ctx=32).forward_from(2, cap[2]), ref)
    res = measure(tiny, [toks.tolist()], SensitivityConfig(probe_bits=(8, 2), max_tokens=12),
                  log=lambda *_: None)
    assert set(res["floors"]) == set(gm.cfg.moe_layers)
    assert all(res["kl"][2][l] > res["kl"][8][l] >= -1e-6 for l in gm.cfg.moe_layers)
    assert set(res["floors"].values()) <= {2, 8}


def test_kl_budget_floors_take_the_cheapest_bytes_within_the_sum():
    from edge.moe.sensitivity import floors_from_budget
    kl = {8: {1: 0.02, 2: 0.001, 3: 0.001}, 4: {1: 0.3, 2: 0.01, 3: 0.2}, 2: {1: 1, 2: 0.5, 3: 1}}
    size = {16: 100, 8: 60, 4: 40, 2: 30}
    nbytes = lambda layer, bits: size[bits]
    # Sum of the chosen KLs stays within budget; sensitive layer 1 stays full.
    assert floors_from_budget(kl, nbytes, 0.012) == {1: 16, 2: 4, 3: 8}
    assert floors_from_budget(kl, nbytes, 0.0) == {1: 16, 2: 16, 3: 16}
    # A step that saves no bytes (matrix already lossless lower) is not taken.
    assert floors_from_budget(kl, lambda l, b: 40, 1.0) == {1: 16, 2: 16, 3: 16}


def test_native_store_reads_a_gridded_matrix_at_its_own_precision(tmp_path):
    """gate/up put on an int4 grid (as a Q4_1 source leaves them): under
    `native` an fp read takes them at int4, exactly, and costs fewer bytes;
    down (random floats) stays full precision."""
    from kernels import quant
    t = random_moe(SPEC, 49152, seed=5)
    for i in range(SPEC.n_layer):
        for k in ("gate", "up"):
            name = f"blk.{i}.ffn_{k}_exps.weight"
            t[name] = np.stack([quant.dequantize(quant.quantize(torch.from_numpy(m), 4)).numpy()
                                for m in t[name]])
    gm = GGUFModel(write_moe(tmp_path / "grid.gguf", SPEC, t, shipped_gguf()))
    plain = ExpertStore(gm, StoreConfig(StorageProfile.from_name("none")))
    native = ExpertStore(gm, StoreConfig(StorageProfile.from_name("none"), native=True))
    assert native.native()[1, "gate"] == native.native()[1, "up"] == 4
    assert native.native()[1, "down"] == 16
    a, b = plain.resident_copy(1, 2, 16), native.resident_copy(1, 2, 16)
    assert b.nbytes < 0.7 * a.nbytes
    torch.testing.assert_close(b.gate, a.gate, rtol=0, atol=2e-3 * float(a.gate.abs().max()))
    torch.testing.assert_close(b.down, a.down, rtol=0, atol=0)
    # int8 of a gridded matrix is the int4 copy, not a finer (and wrong) grid.
    assert torch.equal(native.resident_copy(1, 2, 8).up, b.up)


def test_dymoe_eviction_keeps_the_layer_needed_soonest():
    """Layers run in a cycle: the victim is the expert whose next use is
    furthest away (the layer just computed), where LRU would evict the
    layer about to run."""
    from edge.moe.cache import CacheConfig, ExpertCache
    from edge.moe.store import ExpertWeights
    w = lambda: ExpertWeights(8, 10, torch.zeros(1), torch.zeros(1), torch.zeros(1))
    for use_prior, victim in ((True, (2, 0)), (False, (1, 0))):
        c = ExpertCache(CacheConfig(30, use_prior=use_prior, cycle=4, base_rate={1: .5, 2: .5, 3: .5}))
        for layer in (1, 2):        # then layer 3 runs; after it 0, 1, 2
            c.start_layer(layer)
            c.admit((layer, 0), w())
            c.touch((layer, 0))
        c.start_layer(3)
        c.admit((3, 0), w())
        c.touch((3, 0))
        c.admit((3, 1), w())
        assert victim not in c.entries and len(c.entries) == 3


def test_prompt_keeps_experts_of_layers_it_has_still_to_reach():
    """A rarely used expert of a later layer is evicted first between
    single tokens, but a 38-token prompt will use it within this pass: the
    victim is then the expert of the layer the prompt has passed."""
    from edge.moe.cache import CacheConfig, ExpertCache
    from edge.moe.store import ExpertWeights
    w = lambda: ExpertWeights(8, 10, torch.zeros(1), torch.zeros(1), torch.zeros(1))
    for tokens, victim in ((1, (3, 0)), (38, (1, 0))):
        c = ExpertCache(CacheConfig(30, use_prior=True, cycle=4, base_rate={1: .5, 2: .5, 3: .5}),
                        prior={(3, 0): 0.0})
        c.admit((3, 0), w())                # resident from the warm start, never used yet
        c.start_layer(1, tokens)
        c.admit((1, 0), w())
        c.touch((1, 0))
        c.start_layer(2, tokens)
        c.pinned = {(2, 0), (2, 1)}
        c.admit((2, 0), w())
        c.admit((2, 1), w())
        assert victim not in c.entries and len(c.entries) == 3


def test_batched_io_reads_adjacent_experts_as_one_request(tiny):
    """One latency for a run of experts adjacent on flash, one per expert
    without batching; the flash order decides what is adjacent."""
    import time
    from edge.moe.prefetch import DEMAND, IOQueue
    slow = StorageProfile("slow", 0.0, 60.0)            # latency only: 60 ms a request
    gm = GGUFModel(tiny)
    store = ExpertStore(gm, StoreConfig(slow))
    got = []
    for batch, order, want_requests in ((False, None, 3), (True, None, 1), (True, [1, 3, 0, 2], 2)):
        if order:
            store.set_order({1: order})
        io = IOQueue(store, lambda *a: None, batch=batch)
        t0 = time.perf_counter()
        ws = [f.result() for f in io.submit_many(1, [(0, 16), (1, 16), (2, 16)], DEMAND, 0)]
        dt = time.perf_counter() - t0
        io.close()
        assert io.requests == want_requests
        assert dt >= 0.95 * want_requests * 0.060
        got.append(ws)
    for ws in got[1:]:                                   # same weights however they were read
        for a, b in zip(ws, got[0]):
            assert torch.equal(a.down, b.down) and a.nbytes == b.nbytes
    with pytest.raises(ValueError, match="not one contiguous extent"):
        next(store.read_run(1, [0, 1], 16))              # order [1, 3, 0, 2]: 0 and 1 are apart


def _gridded_moe(tmp_path):
    """The tiny MoE with gate/up put on an exact float16 int4 grid, as a
    Q4_1 source leaves them (down stays random floats)."""
    from kernels import quant
    t = random_moe(SPEC, 49152, seed=5)
    for i in range(SPEC.n_layer):
        for k in ("gate", "up"):
            name = f"blk.{i}.ffn_{k}_exps.weight"
            t[name] = np.stack([quant.dequantize(quant.quantize(torch.from_numpy(m), 4)).half().float().numpy()
                                for m in t[name]])
    return write_moe(tmp_path / "grid.gguf", SPEC, t, shipped_gguf(), dtype=np.float16)


def test_lru_native_reads_the_file_exactly_and_fewer_bytes(tmp_path):
    """lru-native (llama.cpp's mmap of a quantised file) reads gate/up at
    int4 and still reproduces resident-fp bit for bit: the grid is the
    file's own, recovered exactly."""
    path = _gridded_moe(tmp_path)
    ref, _ = run_policy(path, "resident-fp", 100)
    fp, st_fp = run_policy(path, "lru-fp", 30)
    nat, st_nat = run_policy(path, "lru-native", 30)
    np.testing.assert_array_equal(nat, ref)
    np.testing.assert_array_equal(fp, ref)
    per_read = lambda st: st["total"]["bytes_read"] / st["total"]["misses"]
    assert per_read(st_nat) < 0.75 * per_read(st_fp)


def test_ablations_switch_off_one_mechanism_each():
    from dataclasses import asdict
    from edge.moe.policy import DEFAULT_ON, MECHANISMS, TOGGLES, toggled
    base = asdict(PolicyConfig.from_name("dymoe", {1: 4}))
    assert {m for m, f in MECHANISMS.items() if base[f]} == set(DEFAULT_ON)
    changed = {}
    for name in TOGGLES:                    # each mechanism against its default
        p = asdict(PolicyConfig.from_name(name, {1: 4}))
        diff = {k for k in p if p[k] != base[k]} - {"name"}
        assert len(diff) == 1 and p["floors"] == {1: 4}
        mech, on = toggled(name)
        assert on == (mech not in DEFAULT_ON) and p[MECHANISMS[mech]] is on
        changed[mech] = diff.pop()
    assert changed == MECHANISMS
    # Both spellings exist for every mechanism; the one matching the default is dymoe itself.
    for m, f in MECHANISMS.items():
        assert PolicyConfig.from_name(f"dymoe-with-{m}").__dict__[f] is True
        assert PolicyConfig.from_name(f"dymoe-no-{m}").__dict__[f] is False
    p = PolicyConfig.from_name("dymoe-no-importance", {1: 4})
    assert expert_requirements(p, 1, torch.tensor([[0, 1]]), torch.tensor([[0.9, 0.1]])) == {0: 4, 1: 4}
    assert PolicyConfig.from_name("lru-native").native and not PolicyConfig.from_name("lru-fp").native


def test_dymoe_lifts_floors_only_while_every_expert_fits():
    """A floor below what the budget holds saves no read and costs agreement:
    floors rise one ladder step at a time, all layers together, while every
    expert still fits; at a budget that holds everything, full precision."""
    p = PolicyConfig.from_name("dymoe", {1: 4, 2: 8, 3: 16})
    size = {2: 1, 4: 2, 8: 4, 16: 8}
    per_layer = lambda fl: sum(size[b] for b in fl.values())
    assert per_layer({1: 4, 2: 8, 3: 16}) == 14
    assert p.afforded([1, 2, 3], lambda fl: per_layer(fl) <= 13) is p            # floors do not fit: as is
    one = p.afforded([1, 2, 3], lambda fl: per_layer(fl) <= 20)                 # 8, 16, 16 = 20
    assert one.floors == {1: 8, 2: 16, 3: 16} and one.low_for(1) == 8 and one.high_for(1) == 16
    full = p.afforded([1, 2, 3], lambda fl: True)
    assert {full.low_for(l) for l in (1, 2, 3)} == {full.high_for(l) for l in (1, 2, 3)} == {16}
    # Policies without `afford` keep their precision whatever the budget.
    s = PolicyConfig.from_name("static-int4")
    assert s.afforded([1, 2, 3], lambda fl: True) is s


def test_dymoe_at_a_budget_that_holds_everything_runs_full_precision(tmp_path):
    """With every expert resident at full precision dymoe reads nothing and
    computes what resident-fp computes, bit for bit."""
    path = _gridded_moe(tmp_path)
    ref, _ = run_policy(path, "resident-fp", 100)
    got, st = run_policy(path, "dymoe", 100)
    assert set(st["total"]["precision_mix"]) == {"fp"} and st["total"]["misses"] == 0
    assert st["total"]["prefetch_recall"] is None          # nothing to fetch: no look-ahead routing
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("policy", ["static-int4", "lru-prefetch-int4"])
def test_uniform_precision_policies_compute_the_same_at_any_budget(tiny, policy):
    """The benchmark measures their agreement once for every budget: the
    budget changes what is resident, not the weights a token is computed with."""
    assert PolicyConfig.from_name(policy).uniform and not PolicyConfig.from_name("dymoe").uniform
    small, st = run_policy(tiny, policy, 8)
    assert st["total"]["misses"] > 0
    np.testing.assert_array_equal(small, run_policy(tiny, policy, 100)[0])


def test_half_working_copies_are_the_records_values(tmp_path):
    """The half store skips float32 on the way (an F16 file's values taken as
    they are, a record dequantised straight to float16) and must give what
    the float32 store's copies round to, bit for bit, at every precision."""
    path = _gridded_moe(tmp_path)
    gm = GGUFModel(path)
    for native in (False, True):
        f32 = ExpertStore(gm, StoreConfig(StorageProfile.from_name("none"), native=native))
        f16 = ExpertStore(gm, StoreConfig(StorageProfile.from_name("none"), native=native, dtype=torch.float16))
        for bits in (16, 8, 4, 2):
            a, b = f32.resident_copy(2, 5, bits), f16.resident_copy(2, 5, bits)
            assert b.gate_up.dtype == b.down.dtype == torch.float16
            assert torch.equal(b.gate_up.float(), a.gate_up) and torch.equal(b.down.float(), a.down)
