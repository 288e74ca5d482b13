"""Tokenizer, chat template, batched generation and scoring for model.py's Transformer.

Run it:
    python generate.py --model checkpoints/smollm2-135m-instruct --prompt "What is 2+2?"
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

import cli
from model import KVCache, Transformer, resolve_checkpoint

# -----------------------------------------------------------------------------
# Tokenizer and chat template

class Tokenizer:
    """`tokenizer.json` through `tokenizers`; chat prompts from the config's Jinja template."""

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        self.tk = HFTokenizer.from_file(str(path / "tokenizer.json"))
        tc = json.loads((path / "tokenizer_config.json").read_text())
        gen = path / "generation_config.json"
        gc = json.loads(gen.read_text()) if gen.exists() else {}
        cfg = json.loads((path / "config.json").read_text())

        def token(v):  # tokenizer_config stores tokens as strings or {"content": ...}
            return v["content"] if isinstance(v, dict) else v
        self.bos_token, self.eos_token = token(tc.get("bos_token")), token(tc.get("eos_token"))
        eos = gc.get("eos_token_id", cfg.get("eos_token_id"))
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.eos_token:
            eos.append(self.tk.token_to_id(self.eos_token))
        self.eos_ids = sorted({e for e in eos if e is not None})
        pad = token(tc.get("pad_token"))
        self.pad_id = self.tk.token_to_id(pad) if pad else self.eos_ids[0]
        self.template = tc.get("chat_template")
        if isinstance(self.template, list):  # named templates: take the default one
            self.template = next(t["template"] for t in self.template if t["name"] == "default")

    @classmethod
    def from_pretrained(cls, path_or_repo_id):
        return cls(resolve_checkpoint(path_or_repo_id))

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """Render like transformers: sandboxed Jinja, trim_blocks + lstrip_blocks."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        if not self.template:
            raise ValueError("tokenizer_config.json has no chat_template")

        def raise_exception(msg):
            raise ValueError(msg)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: time.strftime(fmt))
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        return env.from_string(self.template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", tools=None)


# -----------------------------------------------------------------------------
# Generation and scoring

def left_pad(seqs, pad_id, device):
    """list of id lists -> ids (B, T) left-padded, mask (B, T)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s, device=device)
            mask[i, T - len(s):] = 1
    return ids, mask


def sample(logits, temperature, top_p, generator):
    """logits (B, V) -> next ids (B,). temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:  # keep the smallest set of tokens whose mass reaches top_p
        p, idx = probs.sort(dim=-1, descending=True)
        drop = p.cumsum(-1) - p > top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, p.masked_fill(drop, 0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0,
             seed=None, stop=None, embed=None):
    """Continue a batch of prompts (strings, rendered already, or id lists).

    embed, optional: left-padded prompt ids (B, T) -> input embeddings (B, T, C) for the prefill,
    in place of the token embeddings (vlm.py splices image features in this way).
    Returns (ids, texts): per prompt the generated token ids, up to and including the eos
    token or the token that completed a stop string, and the decoded text cut before
    the eos/stop string. Each sequence stops on its own; the batch ends when all have.
    """
    device = next(model.parameters()).device
    seqs = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    ids, mask = left_pad(seqs, tokenizer.pad_id, device)
    B, T = ids.shape
    cache = KVCache(model.config, B, T + max_new_tokens, next(model.parameters()).dtype, device)
    gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
    out = [[] for _ in range(B)]
    texts = [None] * B
    done = torch.zeros(B, dtype=torch.bool, device=device)
    x, embeds = ids, (embed(ids) if embed is not None else None)
    for _ in range(max_new_tokens):
        h = model.hidden(x, attention_mask=mask, cache=cache, embeds=embeds)[:, -1]  # (B, C)
        embeds = None
        nxt = sample(model.lm_head(h).float(), temperature, top_p, gen)    # (B,)
        nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_id), nxt)
        for i in (~done).nonzero().flatten().tolist():
            out[i].append(int(nxt[i]))
            if int(nxt[i]) in tokenizer.eos_ids:
                done[i] = True
                texts[i] = tokenizer.decode(out[i][:-1])
            elif stop:
                text = tokenizer.decode(out[i])
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if cut >= 0:
                    done[i], texts[i] = True, text[:cut]
        if done.all():
            break
        # Finished rows keep stepping (their outputs are ignored), so the new slot is real for all.
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        x = nxt[:, None]
    texts = [t if t is not None else tokenizer.decode(o) for t, o in zip(texts, out)]
    return out, texts


def completion_hidden(model, prompts, completions, embed=None):
    """Hidden states that predict each completion token given its prompt (id lists), batched.

    Returns h (N, C), targets (N,), row (N,), col (N,): one entry per completion token over the
    whole batch (N = total completion tokens); token j of completion i sits at [row=i, col=j].
    Differentiable: callers decide about no_grad. `embed` as in `generate`.
    """
    device = next(model.parameters()).device
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    ids, mask = left_pad(seqs, 0, device)
    h = model.hidden(ids, attention_mask=mask, embeds=embed(ids) if embed is not None else None)  # (B, T, C)
    T = ids.size(1)
    row = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(completions)]).to(device)
    col = torch.cat([torch.arange(len(c)) for c in completions]).to(device)
    n = torch.tensor([len(c) for c in completions], device=device)[row]
    slot = T - n + col  # completion token j sits at slot T-n+j and is predicted from slot T-n+j-1
    return h[row, slot - 1], ids[row, slot], row, col


def score(model, prompts, completions, chunk=1024):
    """Log-probabilities of `completions` given `prompts` (id lists), batched.

    Returns (total (B,), token_logp (B, Tc), mask (B, Tc)); token_logp is right-padded with
    zeros. Differentiable. The vocabulary projection is done only at completion positions,
    in chunks (Qwen's lm_head is 152k wide).
    """
    h, targets, row, col = completion_hidden(model, prompts, completions)
    lp = [model.lm_head(h[s:s + chunk]).float().log_softmax(-1).gather(-1, targets[s:s + chunk, None]).squeeze(-1)
          for s in range(0, len(targets), chunk)]
    B, Tc = len(completions), max(len(c) for c in completions)
    token_logp = torch.zeros(B, Tc, device=h.device).index_put((row, col), torch.cat(lp))
    mask = torch.zeros(B, Tc, device=h.device).index_put((row, col), torch.ones_like(targets, dtype=torch.float))
    return token_logp.sum(-1), token_logp, mask


# -----------------------------------------------------------------------------
# CLI

def chat(args):
    device, dtype = cli.device_and_dtype(args)
    model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
    tok = Tokenizer.from_pretrained(args.model)
    prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    t0 = time.time()
    ids, texts = generate(model, tok, [prompt], max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, seed=args.seed)
    dt = time.time() - t0
    print(texts[0])
    print(f"-- {len(ids[0])} tokens in {dt:.1f} s ({len(ids[0]) / dt:.1f} tok/s)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/smollm2-135m-instruct", help="HF-layout folder or hub repo id")
    p.add_argument("--prompt", default="What is the capital of France?", help="one user turn")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    cli.add_device_args(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cli.run(chat, args)
