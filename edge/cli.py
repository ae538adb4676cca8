"""edge-agent: generate text with a draft model on this device and a verifier in the cloud."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from common.daemon_config import ConfigFileError, effective_settings, parse_args_with_config, to_toml
from common.extras import missing_extra
from edge.config import GenConfig
from edge.options import MODES_HELP, add_model_args, build_drafter
from kernels.sampling import SamplingConfig

GEN_EPILOG = MODES_HELP + """
examples:
  edge-agent generate --cloud 127.0.0.1:50051 "Why is the sky blue?"
  edge-agent generate --cloud 127.0.0.1:50052 --mode sync --temperature 0.8 --top-k 8 --n 4 --json "Hi"
"""


def add_generate_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("prompt", help="the prompt (wrapped in the model's chat template unless --raw)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens to generate (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    ap.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    ap.add_argument("--seed", type=int, default=0,
                    help="random seed; completion i uses seed+i. Every random decision is keyed by (seed, position), "
                         "so with --gamma and --window fixed (and --no-cloud-lead, whose lead tokens depend on timing) the same "
                         "seed gives the same output")
    ap.add_argument("--n", type=int, default=1, help="independent completions (default: %(default)s)")
    ap.add_argument("--raw", action="store_true", help="feed PROMPT as is, without the chat template")
    ap.add_argument("--json", action="store_true", help="one JSON object per completion per line")
    ap.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    add_model_args(ap)


def verifier_client(a):
    """The verifier's client from --cloud, the token (--token-file, --token or
    $TANDEM_TOKEN, as the verifier reads its own) and --tls-ca."""
    from common.errors import StartupError
    from common.tokens import load_token
    from edge.client import VerifierClient
    try:
        token = load_token(a.token_file, a.token,
                           warn=lambda msg: print(f"edge-agent: warning: {msg}", file=sys.stderr))
    except StartupError as e:
        raise ValueError(str(e)) from None
    return VerifierClient(a.cloud, token=token, tls_ca=a.tls_ca.read_bytes() if a.tls_ca else None)


def build_config(a) -> GenConfig:
    return GenConfig(mode=a.mode, codec=a.codec, max_tokens=a.max_tokens,
                     sampling=SamplingConfig(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed),
                     gamma=a.gamma, window=a.window, adaptive=not a.no_adaptive, cloud_lead=not a.no_cloud_lead,
                     stop_at_eos=not a.ignore_eos, emulate_device=a.emulate_device, tree=a.tree,
                     require_cloud=getattr(a, "require_cloud", False))


def run_generate(a) -> int:
    from edge.agent import Agent
    from edge.client import CloudError
    from edge.llama_model import Tokenizer
    cfg = build_config(a)
    drafter, vocab_path = build_drafter(a)
    tok = Tokenizer(vocab_path)
    prompt = tok.encode(a.prompt, raw=a.raw)
    client = None
    if cfg.mode != "edge-only":
        client = verifier_client(a)
        if drafter is None or cfg.require_cloud:
            client.wait_ready()       # with a drafter the agent serves edge-only until the verifier answers
    agent = Agent(client, drafter, tok.fingerprint, tok.n_vocab, tok.eos)
    for i in range(a.n):
        run_cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, seed=cfg.sampling.seed + i))
        shown: list[int] = []

        def stream_text(new, shown=shown):
            if a.json:
                return
            text = tok.decode(new, prev=prompt + shown)
            shown.extend(new)
            sys.stdout.write(text)
            sys.stdout.flush()
        try:
            c = agent.generate(prompt, run_cfg, stream_text)
        except CloudError as e:
            print(f"\nedge-agent: verifier error: {e}", file=sys.stderr)
            return 3
        text = tok.decode([t for t in c.tokens if not (t == tok.eos and cfg.stop_at_eos)], prev=prompt)
        if a.json:
            print(json.dumps({"text": text, "tokens": c.tokens, "mode": cfg.mode, "stats": c.stats.as_dict()}),
                  flush=True)
        else:
            s = c.stats
            print(f"\n[{cfg.mode}{' emulated' if s.emulated else ''}] {s.tokens} tokens, "
                  f"{s.tokens_per_s:.1f} tok/s, ttft {s.ttft_s * 1e3:.0f} ms, acceptance {s.acceptance_rate:.2f}, "
                  f"bytes up/down {s.bytes_up}/{s.bytes_down}"
                  f"{', fallback: ' + s.fallback if s.fallback else ''}"
                  f"{f', {s.edge_only_tokens} edge-only tokens (draft model, not verified)' if s.edge_only_tokens else ''}",
                  file=sys.stderr, flush=True)
    if client is not None:
        client.close()
    if drafter is not None:
        drafter.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    ap.add_argument("--log-level", default="WARNING", help="logging level (default: %(default)s)")
    sub = ap.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text (speculative, cloud-only or edge-only)",
                         epilog=GEN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_args(gen)
    gen.set_defaults(func=run_generate)
    from edge.serve.daemon import add_serve_command
    serve = add_serve_command(sub, connect=verifier_client)
    from edge.moe import cli as moe_cli            # listed always; without torch they say which extra to install
    m = sub.add_parser("moeify", help="build the local MoE draft model from the shipped SmolLM2 (needs tandem[moe])")
    moe_cli.add_moeify_args(m)
    m.set_defaults(func=moe_cli.run_moeify)
    c = sub.add_parser("moe-calibrate", help="measure per-layer precision floors for a MoE model (needs tandem[moe])")
    moe_cli.add_calibrate_args(c)
    c.set_defaults(func=moe_cli.run_calibrate)
    try:
        a = parse_args_with_config(ap, argv, target=serve)
    except ConfigFileError as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return 2
    if getattr(a, "print_config", False):
        print(to_toml(effective_settings(serve, a), f"edge-agent {a.command}: effective configuration"), end="")
        return 0
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s edge %(levelname)s %(message)s")
    from edge.client import CloudError
    try:
        return a.func(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return 1
    except CloudError as e:
        print(f"edge-agent: verifier error: {e}", file=sys.stderr)
        return 3
    except ModuleNotFoundError as e:
        line = missing_extra(e)
        if line is None:
            raise
        print(f"edge-agent {a.command}: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
