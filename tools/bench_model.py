"""Benchmark model.py against Hugging Face transformers on the same checkpoint folder.

Prefill (256-token prompts, one forward, logits for the last position only on both sides) and
decode (N new tokens with a KV cache; both sides forced to decode all N) at batch 1 and 8, same
dtype (fp32) and threads, printed as tok/s and ratios. Check the machine is idle first: two cores
shared with another job make every number meaningless.

    make bench
    python tools/bench_model.py --model checkpoints/smollm2-135m-instruct --new-tokens 64 --repeat 2
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate import Tokenizer, generate  # noqa: E402
from model import Transformer  # noqa: E402


def bench(args):
    """Prefill and decode tokens/s, ours vs transformers eager, same folder, dtype, threads."""
    from transformers import AutoModelForCausalLM
    ours = Transformer.from_pretrained(args.model)
    tok = Tokenizer.from_pretrained(args.model)
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    V = ours.config.vocab_size
    print(f"threads {torch.get_num_threads()} | fp32 | {args.model}")
    for B in (1, 8):
        prompt = torch.randint(100, V, (B, 256), generator=g)
        with torch.inference_mode():
            def pre_ours():
                ours.hidden(prompt)[:, -1]
            def pre_hf():
                hf(prompt, logits_to_keep=1)
            def dec_ours():
                generate(ours, FixedLen(tok), prompt[:, :32].tolist(), max_new_tokens=args.new_tokens)
            def dec_hf():
                hf.generate(prompt[:, :32], attention_mask=torch.ones_like(prompt[:, :32]), do_sample=False,
                            min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens, pad_token_id=0)
            res = {}
            for name, fn, ntok in [("prefill ours", pre_ours, B * 256), ("prefill hf", pre_hf, B * 256),
                                   ("decode ours", dec_ours, B * args.new_tokens),
                                   ("decode hf", dec_hf, B * args.new_tokens)]:
                fn()  # warm-up
                t0 = time.perf_counter()
                for _ in range(args.repeat):
                    fn()
                res[name] = ntok * args.repeat / (time.perf_counter() - t0)
        for kind in ("prefill", "decode"):
            o, h = res[f"{kind} ours"], res[f"{kind} hf"]
            print(f"batch {B} | {kind:7s} | ours {o:7.1f} tok/s | transformers {h:7.1f} tok/s | ratio {o / h:.2f}x")


class FixedLen:
    """Tokenizer stand-in for benchmarks: never stops early, so both sides decode equal lengths."""

    def __init__(self, tok):
        self.pad_id, self.eos_ids = tok.pad_id, [-1]

    def decode(self, ids):
        return ""


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/smollm2-135m-instruct", help="HF-layout folder")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per measurement")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bench(args)
