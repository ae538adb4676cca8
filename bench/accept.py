"""`tandem-bench accept`: how much a draft tree could gain, measured without one.

On real task prompts the target samples a continuation (T=0.7, top-p 0.9, as `tandem-bench
spec`); both models are then teacher-forced along it, and at every position the drafter's q is
the one codec Q sends (8-bit, top 16). Per position:

- `alpha_k`: the probability that a node with k children drawn from q without replacement passes
  one on to the target (kernels.tree.accept_probability, exact). alpha_1 is the chain's
  per-position acceptance; alpha_2 - alpha_1 is what one sibling adds where it is tested.
- `ceiling_k`: over every start position, the tokens a block of `--depth` levels accepts if every
  node on the target's path has k children (a full k-ary tree: k^depth nodes, far beyond any
  budget), over what the chain of the same depth accepts; per-position alpha along the path.
  An upper bound on what trees of width k can add per verify pass at this pair's acceptance.

Then what width costs on this machine, real time: one draft step of the dense drafter for one
sequence and for two in one batch (how a branch would be drafted beside the chain), with the
emulated Jetson's modelled time beside them; the `spec` bench holds every step to
max(real, modelled), so width is free there only where the real step fits the model.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench import datasets
from bench.report import markdown_table, write_json

RESULTS = Path(__file__).resolve().parent / "results"
WIDTHS = (1, 2, 3)
COLUMNS = ["dataset", "prompts", "positions", "alpha_1", "alpha_2", "alpha_3", "ceiling_2", "ceiling_3",
           "depth", "uncertain_share", "alpha_1_uncertain", "alpha_2_uncertain"]
UNCERTAIN = 0.8          # positions where the drafter's top token has q below this


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dataset", nargs="+", choices=datasets.DATASETS, default=["humaneval", "mtbench"])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per dataset (default: %(default)s)")
    ap.add_argument("--tokens", type=int, default=48, help="target tokens sampled per prompt (default: %(default)s)")
    ap.add_argument("--depth", type=int, default=6, help="block depth of the ceiling (default: %(default)s)")
    ap.add_argument("--drafter", default="draft-l29", help="derived drafter (default: %(default)s)")
    ap.add_argument("--json", type=Path, default=RESULTS / "accept.json")


def _llama(path: Path):
    from edge.llama_model import load_llama
    return load_llama(path, n_ctx=1024, logits_all=True)       # every position's logits, for teacher forcing


def _positions(target, drafter, prompt: list[int], n: int, cfg, rng) -> list[tuple[np.ndarray, object]]:
    """(p, q) at each of n positions of a continuation the target samples itself."""
    from kernels.sampling import logits_to_probs
    from kernels.sparse import quantize_dist
    target.reset()
    target.eval(prompt)
    for _ in range(n):
        p = logits_to_probs(np.asarray(target.scores[target.n_tokens - 1]), cfg)
        target.eval([int(rng.choice(p.size, p=p))])
    drafter.reset()
    drafter.eval(list(target.input_ids[:target.n_tokens]))
    out = []
    for i in range(len(prompt) - 1, len(prompt) - 1 + n):
        p = logits_to_probs(np.asarray(target.scores[i]), cfg)
        q = quantize_dist(logits_to_probs(np.asarray(drafter.scores[i]), cfg), bits=8, top_k=16)
        out.append((p, q))
    return out


def accepted(a: np.ndarray, depth: int) -> float:
    """Tokens a block of `depth` levels accepts with per-level acceptance a along the path,
    summed over every start position."""
    return float(sum(np.cumprod(a[s:s + depth]).sum() for s in range(a.size - depth + 1)))


def width_costs(drafter_path: Path, reps: int = 20) -> dict:
    """Real seconds of one draft step, one sequence and two in one batch (1 thread, as the
    spec bench's edge), and the emulated Jetson's modelled time for each."""
    from cloud.target import Chunk, Target
    from sim.latency import DEVICES
    t = Target(drafter_path, n_ctx=512, n_seqs=2, n_threads=1)
    try:
        t.decode([Chunk(0, 0, list(range(100, 300)), 1)])
        t.copy(0, 1)

        def step(chunks):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                t.decode(chunks)
                times.append(time.perf_counter() - t0)
            return float(np.median(times))
        one = step([Chunk(0, 200, [7], 1)])
        two = step([Chunk(0, 200, [7], 1), Chunk(1, 200, [8], 1)])
    finally:
        t.close()
    jetson = DEVICES["jetson-orin"]
    return {"draft_step_1_seq_s": round(one, 4), "draft_step_2_seqs_s": round(two, 4),
            "jetson_modelled_1_seq_s": jetson.forward_s(1), "jetson_modelled_2_seqs_s": jetson.forward_s(2)}


def run(args) -> int:
    from edge.derive import ensure
    from edge.llama_model import Tokenizer
    from edge.model_files import shipped_gguf
    from kernels.sampling import SamplingConfig
    from kernels.tree import accept_probability
    cfg = SamplingConfig(temperature=0.7, top_p=0.9, seed=1)
    tok = Tokenizer(shipped_gguf())
    drafter_path = ensure(args.drafter)
    target, drafter = _llama(shipped_gguf()), _llama(drafter_path)
    rows = []
    t0 = time.monotonic()
    for name in args.dataset:
        rng = np.random.default_rng(0)
        alphas = []                              # per position: alpha_1..alpha_K, q's top weight
        prompts = datasets.load(name, args.prompts)
        for i, pr in enumerate(prompts):
            per = []
            for p, q in _positions(target, drafter, tok.encode(pr.text, raw=pr.raw), args.tokens, cfg, rng):
                per.append([accept_probability(p, q, k) for k in WIDTHS] + [q.weights.max() / q.total])
            alphas.append(np.array(per))
            print(f"[accept {name}: prompt {i + 1}/{len(prompts)}, {time.monotonic() - t0:4.0f}s]", flush=True)
        a = np.concatenate(alphas)
        unsure = a[:, -1] < UNCERTAIN
        row = {"dataset": name, "drafter": args.drafter, "prompts": len(prompts), "positions": len(a),
               "depth": args.depth, "uncertain_share": round(float(unsure.mean()), 3),
               "alpha_1_uncertain": round(float(a[unsure, 0].mean()), 3) if unsure.any() else None,
               "alpha_2_uncertain": round(float(a[unsure, 1].mean()), 3) if unsure.any() else None}
        for j, k in enumerate(WIDTHS):
            row[f"alpha_{k}"] = round(float(a[:, j].mean()), 4)
            if k > 1:       # blocks never span two prompts
                row[f"ceiling_{k}"] = round(sum(accepted(x[:, j], args.depth) for x in alphas)
                                            / sum(accepted(x[:, 0], args.depth) for x in alphas), 3)
        rows.append(row)
        print(f"[accept] {name}: alpha_1 {row['alpha_1']} alpha_2 {row['alpha_2']} alpha_3 {row['alpha_3']}  "
              f"ceiling x{row['ceiling_2']} (width 2), x{row['ceiling_3']} (width 3) at depth {args.depth}",
              flush=True)
    costs = width_costs(drafter_path)
    print(f"[accept] draft step, real: {costs['draft_step_1_seq_s'] * 1e3:.1f} ms for one sequence, "
          f"{costs['draft_step_2_seqs_s'] * 1e3:.1f} ms for two (emulated Jetson: "
          f"{costs['jetson_modelled_1_seq_s'] * 1e3:.1f} / {costs['jetson_modelled_2_seqs_s'] * 1e3:.1f} ms)",
          flush=True)
    write_json({"rows": rows, "meta": costs}, args.json)
    md = ["# tandem-bench accept", "", __doc__.strip(), "", markdown_table(rows, COLUMNS, floats=3), "",
          "Width costs (real, this machine; 1 thread): " + ", ".join(f"{k} = {v}" for k, v in costs.items()), ""]
    args.json.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"accept: {len(rows)} rows -> {args.json}")
    return 0

