"""Tokenizer, chat template, batched generation and scoring for model.py's Transformer.

  Tokenizer             tokenizer.json through `tokenizers`; chat prompts rendered from the
                        checkpoint's Jinja template as transformers renders them.
  generate              the engine every script answers through (evals.common.answer wraps it):
                        continuous batching (`slots` rows of one KV cache stay busy; a finished row's
                        slot goes to the next waiting one at once), prefix sharing (the `samples`
                        answers to one prompt share one prefill, copied into their slots), per-row
                        SVF z (`zs`: rows of one batch run different experts, or the base weights
                        with `base_rows`), per-row sampling generators (output independent of
                        `slots`), incremental stop-string checks, an `embed` hook for images (vlm.py).
  completion_hidden     teacher-forced hidden states of completions given their prompts, one prompt
                        forward shared by its answers (the policy gradient in reinforce.py);
  score                 their log-probabilities (cem.py's tie-break).
Prompts are right-padded: each row keeps positions 0, 1, ... and causality hides the padding.

    python generate.py --model checkpoints/smollm2-135m-instruct --prompt "What is 2+2?"
"""
import argparse
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

import cli
from model import KVCache, Transformer, resolve_checkpoint

# -----------------------------------------------------------------------------
# Tokenizer and chat template

class Tokenizer:
    """`tokenizer.json` through `tokenizers`; chat prompts from the config's Jinja template."""

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer
        self.path = path = Path(path)
        self.tk = HFTokenizer.from_file(str(path / "tokenizer.json"))
        tc, gc, cfg = (read_optional_json(path / f) for f in ("tokenizer_config.json", "generation_config.json", "config.json"))

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
        self.template = read_chat_template(path, tc)

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
            raise ValueError(f"{self.path}: no chat template (looked in {', '.join(TEMPLATE_FILES)})")

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


# Where a checkpoint keeps its chat template, in the order transformers reads them: its own file
# (what transformers >= 4.43 saves and recent hub repos ship), a processor's file (llava-hf), then
# the older key in tokenizer_config.json (a string, or a list of named templates).
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def read_chat_template(path, tc):
    """The default chat template of the folder `path` (tc: its tokenizer_config.json), or None."""
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    t = read_optional_json(path / "chat_template.json").get("chat_template") or tc.get("chat_template")
    if isinstance(t, list):  # named templates [{"name": ..., "template": ...}]: transformers uses "default"
        named = {d["name"]: d["template"] for d in t}
        if "default" not in named:
            raise ValueError(f"{path}: chat templates {sorted(named)} include no 'default'")
        t = named["default"]
    return t


def read_optional_json(f):
    """A JSON file's dict, {} if the file is absent; a broken file is an error that names it."""
    try:
        return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: cannot read ({e})") from None


# -----------------------------------------------------------------------------
# Generation and scoring

class Generation(NamedTuple):
    """What `generate` returns, one entry per row (prompt-major: prompt i's samples are rows
    i*samples ... i*samples + samples - 1)."""
    ids: list    # generated token ids, up to and including the eos token or the token completing a stop string
    texts: list  # decoded text, cut before the eos token / stop string
    cut: list    # True where the row ran into its token cap (no eos, no stop string): an unfinished answer


def right_pad(seqs, pad_id, device):
    """list of id lists -> ids (B, T) right-padded, lengths (B,). Padding comes after each row's
    real tokens, where causality hides it from them (model.Transformer.hidden)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long, device=device)
    return ids, torch.tensor([len(s) for s in seqs], device=device)


def sample(logits, temperature, top_p, u):
    """logits (B, V) -> next ids (B,). temperature 0 = greedy. Otherwise inverse-CDF sampling with
    one uniform u (B,) per row, drawn from the row's own generator: a row's tokens then do not
    depend on which other rows happen to share its batch (or on the number of slots)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:  # keep the smallest set of tokens whose mass reaches top_p
        p, idx = probs.sort(dim=-1, descending=True)
        drop = p.cumsum(-1) - p > top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, p.masked_fill(drop, 0))
    cdf = probs.cumsum(-1)                                               # (B, V)
    # right=True: the first token whose cdf exceeds u, so a zero-probability token is never chosen
    nxt = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return nxt.clamp(max=logits.size(-1) - 1)


class StopStrings:
    """Has a row's output just produced a stop string? Only the newest token can complete one, so
    each step decodes a short tail of the output (enough tokens for the longest stop string, at
    ≥ 1 byte per token), not the whole output again: linear in the output length, not quadratic."""

    def __init__(self, tokenizer, stop):
        self.tokenizer, self.stop = tokenizer, [s for s in (stop or []) if s]
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 4

    def __call__(self, ids):
        """The output's text cut before the first stop string, or None if it holds none."""
        if not self.stop or not any(s in self.tokenizer.decode(ids[-self.window:]) for s in self.stop):
            return None
        text = self.tokenizer.decode(ids)
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[:min(cuts)] if cuts else None


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None,
             stop=None, samples=1, slots=64, zs=None, rescale=True, base_rows=None, embed=None, stats=None,
             progress=None, on_done=None):
    """Continue prompts (strings, already rendered, or id lists) with continuous batching.

    The engine keeps `slots` rows of one KV cache busy: when a row ends (eos, a stop string, or
    its token cap) the next waiting row takes its slot at once, instead of the whole batch
    stepping until its longest answer is done. A row's prompt is prefilled into its slot and it
    decodes at its own positions. The `samples` answers to one prompt share a single prefill:
    its keys/values are copied into each sample's slot. Each row samples from its own generator
    (seed + row; or seed[prompt] + sample with one seed per prompt), so the output does not depend
    on `slots` or on scheduling; greedy rows equal one-by-one generation.

    max_new_tokens: an int, or one cap per prompt.
    zs: optional SVF scales per prompt, {parameter name: (len(prompts), r)}; before every forward
        the rows in the batch get their prompt's z (svf.set_z; rescale as there), so rows of one
        batch can run different experts. base_rows: optional bool per prompt, True = that prompt runs
        on the base weights themselves (svf.set_z's base_rows). The SVF modules are reset at the end.
    embed: optional (ids (B, T), prompt indices) -> input embeddings (B, T, C) for a prefill
        (vlm.py splices each prompt's images in this way).
    stats: optional dict; seconds and tokens of prefill and decode are added to it (benchmarks).
    progress: optional label; shows a progress bar of finished answers (stderr) under that name.
    on_done: optional on_done(row, ids, text, cut), called as each row finishes (callers save
        finished answers as they come, so a killed run keeps them).
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    seqs = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    caps = [max_new_tokens] * len(seqs) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    R = len(seqs) * samples
    out, texts, cut = [[] for _ in range(R)], [None] * R, [False] * R
    queue = deque(r for r in range(R) if caps[r // samples] > 0)
    if not queue:
        return Generation(out, [""] * R, cut)
    if seed is None:  # drawn from torch's global RNG, so torch.manual_seed still makes runs repeatable
        seed = int(torch.randint(2 ** 31, ()))
    if isinstance(seed, int):  # row r samples with seed + r; a list gives each prompt its own base seed
        seed = [seed + i * samples for i in range(len(seqs))]
    gens = {}         # row -> its generator (sampling only)
    stops = StopStrings(tokenizer, stop)
    eos = set(tokenizer.eos_ids)
    if zs is not None:
        import svf   # only runs with per-row experts need it
    n_slots = max(1, min(slots or R, len(queue)))
    cache = KVCache(model.config, n_slots, max(len(s) for s in seqs) + max(caps), dtype, device)
    rows, pos, last = [], [], []  # per busy slot (slots 0..len(rows)-1): its row, next position, last token
    prefix = {}                   # prompt -> (its prefill cache, row there, first-token logits) while samples wait
    waiting = {}                  # prompt -> how many of its rows are not admitted yet

    def forward(ids, p, c, prompt_rows, embeds=None):
        if zs is not None:
            base = None if base_rows is None else [base_rows[i] for i in prompt_rows]
            svf.set_z(model, {n: z[prompt_rows] for n, z in zs.items()}, rescale, base_rows=base)
        return model.hidden(ids, p, c, embeds)

    def draw(batch_rows, logits):
        u = None
        if temperature > 0:
            for r in batch_rows:
                if r not in gens:
                    gens[r] = torch.Generator(device).manual_seed(seed[r // samples] + r % samples)
            u = torch.stack([torch.rand((), generator=gens[r], device=device) for r in batch_rows])
        return sample(logits, temperature, top_p, u).tolist()

    def record(s, tok):
        """Append tok to slot s's row; True when the row is done."""
        r = rows[s]
        out[r].append(tok)
        last[s] = tok
        if tok in eos:
            texts[r] = tokenizer.decode(out[r][:-1])
            return True
        texts[r] = stops(out[r])
        if texts[r] is not None:
            return True
        if len(out[r]) >= caps[r // samples]:
            cut[r] = True
            return True
        return False

    for r in queue:
        waiting[r // samples] = waiting.get(r // samples, 0) + 1
    bar = tqdm(total=len(queue), desc=progress, unit="answer", leave=False, disable=progress is None)
    try:
        while queue or rows:
            new = []
            while queue and len(rows) + len(new) < n_slots:
                new.append(queue.popleft())
            t0 = time.perf_counter()
            if new:  # admit: prefill each new prompt once, copy its keys/values into its rows' slots
                fresh = sorted({r // samples for r in new} - prefix.keys())
                if fresh:
                    ids, lens = right_pad([seqs[i] for i in fresh], tokenizer.pad_id, device)
                    pc = KVCache(model.config, len(fresh), ids.size(1), dtype, device)
                    h = forward(ids, None, pc, fresh, embed(ids, fresh) if embed is not None else None)
                    logits = model.lm_head(h[torch.arange(len(fresh), device=device), lens - 1]).float()  # (F, V)
                    prefix.update({i: (pc, j, logits[j]) for j, i in enumerate(fresh)})
                first = []
                for r in new:
                    i = r // samples
                    pc, j, lg = prefix[i]
                    cache.copy_row(j, len(rows), len(seqs[i]), source=pc)
                    rows.append(r)
                    pos.append(len(seqs[i]))
                    last.append(None)
                    first.append(lg)
                    waiting[i] -= 1
                    if waiting[i] == 0:
                        del prefix[i]
                busy = range(len(rows) - len(new), len(rows))
                toks = draw(new, torch.stack(first))
                phase, tokens = "prefill", sum(len(seqs[i]) for i in fresh)
            else:    # one decode step for every busy slot, each at its own position
                busy = range(len(rows))
                x = torch.tensor(last, device=device)[:, None]                    # (B, 1)
                p = torch.tensor(pos, device=device)[:, None]                     # (B, 1)
                h = forward(x, p, cache.rows(0, len(rows)), [r // samples for r in rows])[:, -1]  # (B, C)
                toks = draw(rows, model.lm_head(h).float())
                pos = [q + 1 for q in pos]
                phase, tokens = "decode", len(rows)
            if stats is not None:
                stats[phase + "_s"] = stats.get(phase + "_s", 0.0) + time.perf_counter() - t0
                stats[phase + "_tokens"] = stats.get(phase + "_tokens", 0) + tokens
            done = [s for s, tok in zip(busy, toks) if record(s, tok)]
            bar.update(len(done))
            for s in done if on_done is not None else ():
                r = rows[s]
                on_done(r, out[r], texts[r] if texts[r] is not None else tokenizer.decode(out[r]), cut[r])
            for s in sorted(done, reverse=True):  # free the slot: the last busy slot moves into the hole
                b = len(rows) - 1
                if s != b:
                    cache.copy_row(b, s, pos[b])
                    rows[s], pos[s], last[s] = rows[b], pos[b], last[b]
                del rows[-1], pos[-1], last[-1]
    finally:
        bar.close()
        if zs is not None:
            svf.set_z(model, None)
    texts = [t if t is not None else tokenizer.decode(o) for t, o in zip(texts, out)]
    return Generation(out, texts, cut)


def completion_hidden(model, prompts, completions, embed=None, share=True):
    """Hidden states that predict each completion token given its prompt (id lists), batched.

    Completions whose prompts are equal (the --samples answers to one question) share one forward
    of that prompt: its keys/values are computed once and every completion attends to them, so the
    prompt's forward and backward are paid once per question, not once per answer; the gradient
    is the same as running each (prompt, completion) pair on its own (tests/test_generate.py).
    Returns h (N, C), targets (N,), row (N,), col (N,): one entry per completion token over the
    whole batch (N = total completion tokens); token j of completion i sits at [row=i, col=j].
    Differentiable: callers decide about no_grad. embed(ids, prompt indices) as in `generate`;
    with embed, prompts are not merged (equal ids may carry different images), nor with share=False
    (rows running different SVF z per row: their prompts' keys/values differ).
    """
    device = next(model.parameters()).device
    keys = [tuple(p) for p in prompts] if embed is None and share else list(range(len(prompts)))
    first = {}
    owner = torch.tensor([first.setdefault(k, len(first)) for k in keys], device=device)  # (R,)
    uniq = [list(prompts[keys.index(k)]) for k in first]
    pids, plen = right_pad(uniq, 0, device)                                 # (U, Tp)
    cids, clen = right_pad(completions, 0, device)                          # (R, Tc)
    Tp, Tc = pids.size(1), cids.size(1)
    cache = KVCache(model.config, len(uniq), Tp + Tc, next(model.parameters()).dtype, device)
    hp = model.hidden(pids, None, cache, embed(pids, list(range(len(uniq)))) if embed is not None else None)
    last = hp[torch.arange(len(uniq), device=device), plen - 1]             # (U, C): predicts each first token
    # each completion continues its prompt's row of the cache, at positions len(prompt) + j
    cpos = plen[owner][:, None] + torch.arange(Tc, device=device)           # (R, Tc)
    hc = model.hidden(cids, cpos, cache.gather(owner))                      # (R, Tc, C)
    hs = torch.cat([last[owner][:, None], hc[:, :-1]], dim=1)               # (R, Tc, C): hs[:, j] predicts token j
    row = torch.cat([torch.full((int(n),), i, dtype=torch.long) for i, n in enumerate(clen.tolist())]).to(device)
    col = torch.cat([torch.arange(int(n)) for n in clen.tolist()]).to(device)
    return hs[row, col], cids[row, col], row, col


def score(model, prompts, completions, chunk=1024, share=True):
    """Log-probabilities of `completions` given `prompts` (id lists), batched.

    Returns (total (B,), token_logp (B, Tc), mask (B, Tc)); token_logp is right-padded with
    zeros. Differentiable. The vocabulary projection is done only at completion positions,
    in chunks (Qwen's lm_head is 152k wide). share as in `completion_hidden`.
    """
    h, targets, row, col = completion_hidden(model, prompts, completions, share=share)
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
    g = generate(model, tok, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    dt = time.time() - t0
    print(g.texts[0])
    print(f"-- {len(g.ids[0])} tokens in {dt:.1f} s ({len(g.ids[0]) / dt:.1f} tok/s)" + (" (cut at the cap)" if g.cut[0] else ""))


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
