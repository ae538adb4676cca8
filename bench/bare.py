"""A bare llama-cpp-python decoding loop: what the target model does with no
server around it. N sequences are prefilled, then decoded greedily together,
one token per sequence per `llama_decode`; prints {"tokens_per_s": ...} as JSON.

Run as its own process (`python -m bench.bare --seqs 8 --threads 1`), so its
thread count and OpenMP wait policy are its own, as the verifier's are.
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np


def decode_loop(model_path: str, n_seqs: int, n_threads: int, n_tokens: int, prompt_len: int = 24) -> float:
    import llama_cpp as ll
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    ll.llama_backend_init()
    model = ll.llama_model_load_from_file(model_path.encode(), ll.llama_model_default_params())
    cp = ll.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 512 * n_seqs, 512, 32, n_seqs
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
    cp.kv_unified = False
    ctx = ll.llama_init_from_model(model, cp)
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    batch = ll.llama_batch_init(512, 0, 1)
    rng = np.random.default_rng(0)

    def run(items):                              # [(seq, pos, token, want_logits)]
        for i, (s, p, t, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, want
            batch.seq_id[i][0] = s
        batch.n_tokens = len(items)
        if ll.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    prompts = [[int(x) for x in rng.integers(100, 40000, prompt_len)] for _ in range(n_seqs)]
    run([(s, p, t, p == prompt_len - 1) for s in range(n_seqs) for p, t in enumerate(prompts[s])])
    last = [int(np.argmax(np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, (s + 1) * prompt_len - 1),
                                                  shape=(n_vocab,)))) for s in range(n_seqs)]
    t0 = time.perf_counter()
    for k in range(n_tokens):
        run([(s, prompt_len + k, last[s], True) for s in range(n_seqs)])
        last = [int(np.argmax(np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, s), shape=(n_vocab,))))
                for s in range(n_seqs)]
    elapsed = time.perf_counter() - t0
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return n_seqs * n_tokens / elapsed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    ap.add_argument("--model", help="GGUF (default: the shipped SmolLM2-135M)")
    ap.add_argument("--seqs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args(argv)
    if a.model is None:
        from edge.model_files import shipped_gguf
        a.model = str(shipped_gguf())
    rate = decode_loop(a.model, a.seqs, a.threads, a.tokens)
    print(json.dumps({"seqs": a.seqs, "threads": a.threads, "tokens_per_s": round(rate, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
