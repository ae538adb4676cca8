"""How good is a MoE as a drafter: top-1 vs dense, acceptance, perplexity.

All on held-out target-generated text (greedy answers to prompts that were
not used for calibration). Teacher-forced: acceptance is the share of answer
positions where the MoE's argmax is the target's greedy token.
"""
from __future__ import annotations

import math

import torch

from edge.moe.model import MoETransformer


def evaluate(model_factory, dense_logits_fn, texts, prompt_lens) -> dict:
    """model_factory() -> fresh MoETransformer; dense_logits_fn(tokens) -> (T, V)."""
    agree = n_all = acc = n_ans = 0
    nll = 0.0
    for tokens, pl in zip(texts, prompt_lens):
        m: MoETransformer = model_factory()
        ids = torch.tensor(tokens)
        lg = m.forward(ids)[:-1]                                        # predicts tokens[1:]
        dn = dense_logits_fn(tokens)[:-1]
        agree += (lg.argmax(-1) == dn.argmax(-1)).sum().item()
        n_all += lg.shape[0]
        ans = slice(pl - 1, None)
        tgt = ids[1:][ans]
        acc += (lg[ans].argmax(-1) == tgt).sum().item()
        nll += torch.nn.functional.cross_entropy(lg[ans], tgt, reduction="sum").item()
        n_ans += tgt.numel()
    return {"top1_vs_dense": agree / n_all, "acceptance": acc / n_ans,
            "ppl": math.exp(nll / n_ans), "positions": n_all, "answer_positions": n_ans}


def dense_quality(dense_logits_fn, texts, prompt_lens) -> dict:
    acc = n = 0
    nll = 0.0
    for tokens, pl in zip(texts, prompt_lens):
        ids = torch.tensor(tokens)
        lg = dense_logits_fn(tokens)[:-1][pl - 1:]
        tgt = ids[1:][pl - 1:]
        acc += (lg.argmax(-1) == tgt).sum().item()
        nll += torch.nn.functional.cross_entropy(lg, tgt, reduction="sum").item()
        n += tgt.numel()
    return {"acceptance": acc / n, "ppl": math.exp(nll / n)}
