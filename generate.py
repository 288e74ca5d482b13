"""Tokenizer, chat template, batched generation and scoring for model.py's Transformer.

  Tokenizer             tokenizer.json through `tokenizers`; chat prompts rendered from the
                        checkpoint's Jinja template as transformers renders them.
  Engine                continuous batching a step at a time: admit rows (Row: a prompt, its cap,
                        sampling, z), one decode step, retire finished rows; the slot bookkeeping is
                        one small object (Slots). serve.py drives it directly, requests joining as
                        others decode.
  generate              the loop over the Engine every script answers through (evals.common.answer
                        wraps it): continuous batching (`slots` rows of one KV cache stay busy; a finished row's
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
Why past docs/STYLE.md's 150–300 lines: the Engine that serve.py drives and every script answers through
(admit, step, retire; per-row z and sampling) sits beside the chat template and the scoring.
"""
import argparse
import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
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
# Generation: the engine, a step at a time

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
    """logits (B, V) -> next ids (B,). u None = greedy. Otherwise inverse-CDF sampling with one
    uniform u (B,) per row, drawn from the row's own generator: a row's tokens then do not depend
    on which other rows happen to share its batch (or on the number of slots). temperature and
    top_p are numbers or one per row, (B,) tensors (a server's requests differ); a row with
    temperature 0 is greedy."""
    greedy = logits.argmax(-1)
    if u is None:
        return greedy
    t = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device).reshape(-1, 1)  # (B, 1) or (1, 1)
    probs = torch.softmax(logits / torch.where(t > 0, t, 1.0), dim=-1)
    if torch.is_tensor(top_p) or top_p < 1.0:  # keep the smallest set of tokens whose mass reaches top_p
        keep = torch.as_tensor(top_p, dtype=probs.dtype, device=probs.device).reshape(-1, 1)
        keep = torch.where(keep < 1, keep, torch.inf)  # top_p 1 keeps all: rounding in cumsum must not drop a token
        p, idx = probs.sort(dim=-1, descending=True)
        drop = p.cumsum(-1) - p > keep
        probs = torch.zeros_like(probs).scatter(-1, idx, p.masked_fill(drop, 0))
    cdf = probs.cumsum(-1)                                               # (B, V)
    # right=True: the first token whose cdf exceeds u, so a zero-probability token is never chosen
    nxt = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return torch.where(t[:, 0] > 0, nxt.clamp(max=logits.size(-1) - 1), greedy)


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


@dataclass(eq=False)  # eq=False: rows compare by identity (two requests may ask the same thing)
class Row:
    """One answer in the making: what it continues, how it samples, which weights it runs on, and
    (filled in by the engine) what it has said so far."""
    prompt: list                # token ids
    cap: int                    # most new tokens (>= 1)
    key: object = None          # rows with equal keys have equal prompts and weights: one prefill serves them
    share: int = 1              # how many rows carry this key (the prefill is kept until all are admitted)
    z: dict = None              # {name: (r,)} SVF scales before the Σσ rescale; None with base=True
    base: bool = False          # run on the base weights W exactly (svf.set_z's base_rows)
    temperature: float = 0.0    # 0 = greedy
    top_p: float = 1.0
    seed: int = 0               # the row's own generator (sampling only)
    stop: StopStrings = None
    tag: object = None          # the caller's: row number in `generate`, a request in serve.py
    ids: list = field(default_factory=list)  # generated so far
    text: str = None            # the answer, set when the row is done
    cut: bool = False           # done because it hit `cap`

    @property
    def pos(self):
        """Slots of the KV cache written so far = the position the next fed token goes to (its
        newest token is sampled, not fed yet)."""
        return len(self.prompt) + len(self.ids) - 1


class Slots:
    """The KV cache's rows and who sits in them. Busy rows always fill slots 0..n-1, so a decode
    step runs on one block of the cache: a finished row's slot gets the last busy row, which takes
    its keys/values and its per-slot tensors (`state`, each (n_slots, ...) on the device) along."""

    def __init__(self, cache, **state):
        self.cache, self.state, self.rows = cache, state, []

    def __len__(self):
        return len(self.rows)

    def add(self, row):
        self.rows.append(row)
        return len(self.rows) - 1

    def remove(self, s):
        b = len(self.rows) - 1
        if s != b:  # the last busy row moves into the hole
            self.cache.copy_row(b, s, self.rows[b].pos)
            for t in self.state.values():
                t[s] = t[b]
            self.rows[s] = self.rows[b]
        self.rows.pop()


class Engine:
    """Continuous batching over one KV cache of `n_slots` rows, one call at a time:

      admit(rows)   prefill the new rows' prompts (once per key), put each in a free slot, sample its
                    first token;
      step()        one decode step for every busy row, each at its own position;
      cancel(row)   free a row's slot before it is done (a server's client went away).
    admit and step return the rows that just finished (eos, a stop string, or their cap); their
    slots are free at once. Per-slot state stays on the model's device: last token, position,
    tokens drawn, sampling settings, uniforms, SVF z (rescale folded in at admission). Each step
    syncs with the host once, to read the new tokens (a row ends on a token's text).

    per_row_z: rows carry their own z (SVF layers attached: svf.attach); every forward gives each
    row its z (svf.set_z), so rows of one batch run different experts. embed(ids, keys): input
    embeddings for a prefill (vlm.py)."""

    def __init__(self, model, tokenizer, n_slots, max_len, per_row_z=False, rescale=True, embed=None):
        self.model, self.tokenizer, self.n_slots, self.embed, self.rescale = model, tokenizer, n_slots, embed, rescale
        self.device, self.dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.eos = set(tokenizer.eos_ids)
        if per_row_z:
            import svf  # only engines with per-row experts need it
            self.svf, self.S = svf, {n: m.S for n, m in svf.svf_modules(model)}  # name -> σ (r,)
        else:
            self.S = {}
        dev = {"device": self.device}
        self.slots = Slots(KVCache(model.config, n_slots, max_len, self.dtype, self.device),
                           tok=torch.zeros(n_slots, dtype=torch.long, **dev),   # last token (fed next)
                           pos=torch.zeros(n_slots, dtype=torch.long, **dev),   # its position
                           n=torch.zeros(n_slots, dtype=torch.long, **dev),     # tokens drawn so far
                           u=torch.zeros(n_slots, max_len, **dev),              # each draw's uniform
                           temp=torch.zeros(n_slots, **dev), top_p=torch.ones(n_slots, **dev),
                           **{n: torch.ones(n_slots, S.numel(), dtype=S.dtype, **dev) for n, S in self.S.items()})
        self.prefix = {}  # key -> [prefill cache, row there, first-token logits, rows still to admit]
        self.tokens = {"prefill": 0, "decode": 0}  # forwarded so far (benchmarks, usage)

    def free(self):
        return self.n_slots - len(self.slots)

    def admit(self, rows):
        st, s0 = self.slots.state, len(self.slots)
        fresh = list({r.key: r for r in reversed(rows) if r.key not in self.prefix}.values())[::-1]  # first per key
        if fresh:  # one right-padded forward of the new prompts; the keys/values stay for the key's rows
            ids, lens = right_pad([r.prompt for r in fresh], self.tokenizer.pad_id, self.device)  # (F, T)
            pc = KVCache(self.model.config, len(fresh), ids.size(1), self.dtype, self.device)
            self._use_z(fresh, {n: self._fold(n, fresh) for n in self.S})
            embeds = self.embed(ids, [r.key for r in fresh]) if self.embed is not None else None
            h = self.model.prefill(ids, pc, embeds)  # in chunks of at most model.max_prefill_tokens
            logits = self.model.lm_head(h[torch.arange(len(fresh), device=self.device), lens - 1]).float()  # (F, V)
            self.prefix.update({r.key: [pc, j, logits[j], r.share] for j, r in enumerate(fresh)})
            self.tokens["prefill"] += int(lens.sum())
        first = []
        for r in rows:  # copy the prefill into the row's slot
            entry = self.prefix[r.key]
            self.slots.cache.copy_row(entry[1], self.slots.add(r), len(r.prompt), source=entry[0])
            first.append(entry[2])
            entry[3] -= 1
            if entry[3] == 0:
                del self.prefix[r.key]
        new = slice(s0, len(self.slots))
        st["pos"][new] = torch.tensor([len(r.prompt) for r in rows])
        st["n"][new] = 0
        st["temp"][new] = torch.tensor([float(r.temperature) for r in rows])
        st["top_p"][new] = torch.tensor([float(r.top_p) for r in rows])
        for s, r in enumerate(rows, s0):  # a row's uniforms, drawn once: its tokens never wait on the host RNG
            if r.temperature > 0:
                g = torch.Generator(self.device).manual_seed(r.seed)
                st["u"][s, :r.cap] = torch.rand(r.cap, generator=g, device=self.device)
        for n in self.S:
            st[n][new] = self._fold(n, rows)
        return self._advance(s0, torch.stack(first))

    def step(self):
        st, B = self.slots.state, len(self.slots)
        self._use_z(self.slots.rows, {n: st[n][:B] for n in self.S})
        x, p = st["tok"][:B, None], st["pos"][:B, None]                                  # (B, 1) each
        S = 1 + max(r.pos for r in self.slots.rows)  # slots to attend over, known here: no host sync
        h = self.model.hidden(x, p, self.slots.cache.rows(0, B), kv_len=S)[:, -1]         # (B, C)
        st["pos"][:B] += 1
        self.tokens["decode"] += B
        return self._advance(0, self.model.lm_head(h).float())

    def cancel(self, row):
        if row in self.slots.rows:
            self.slots.remove(self.slots.rows.index(row))

    def close(self):
        if self.S:
            self.svf.set_z(self.model, None)  # the SVF modules back to the base weights

    def _fold(self, name, rows):
        """(len(rows), r) z of `name` with the Σσ rescale folded in (a placeholder 1 for base rows)."""
        S = self.S[name]
        z = torch.stack([r.z[name] if r.z is not None else torch.ones_like(S) for r in rows]).to(S)
        return self.svf.fold_rescale(S, z, self.rescale)

    def _use_z(self, rows, zs):
        if self.S:
            base = [i for i, r in enumerate(rows) if r.base]
            self.svf.set_z(self.model, zs, rescale=False,
                           base_rows=torch.tensor(base, device=self.device) if base else None)

    def _advance(self, s0, logits):
        """Slots s0.. draw their next token from logits (B, V); the finished rows leave their slots."""
        st, rows = self.slots.state, self.slots.rows[s0:]
        s = slice(s0, s0 + len(rows))
        u = st["u"][torch.arange(s0, s.stop, device=self.device), st["n"][s]] if any(
            r.temperature > 0 for r in rows) else None                                      # (B,)
        top_p = st["top_p"][s] if any(r.top_p < 1 for r in rows) else 1.0
        nxt = sample(logits, st["temp"][s], top_p, u)                                       # (B,)
        st["tok"][s] = nxt
        st["n"][s] += 1
        done = [(i, r) for i, (r, t) in enumerate(zip(rows, nxt.tolist()), s0) if self._append(r, t)]  # the host sync
        for i, _ in reversed(done):  # highest slot first: a row moved into a hole is never a finished one
            self.slots.remove(i)
        return [r for _, r in done]

    def _append(self, r, tok):
        """tok joins row r's answer; True when that ends it."""
        r.ids.append(tok)
        if tok in self.eos:
            r.text = self.tokenizer.decode(r.ids[:-1])
        elif r.stop is not None and (text := r.stop(r.ids)) is not None:
            r.text = text
        elif len(r.ids) >= r.cap:
            r.text, r.cut = self.tokenizer.decode(r.ids), True
        return r.text is not None


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None,
             stop=None, samples=1, slots=64, zs=None, rescale=True, base_rows=None, embed=None,
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
    progress: optional label; shows a progress bar of finished answers (stderr) under that name.
    on_done: optional on_done(row, ids, text, cut), called as each row finishes (callers save
        finished answers as they come, so a killed run keeps them).
    """
    seqs = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    caps = [max_new_tokens] * len(seqs) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    R = len(seqs) * samples
    if R == 0 or not any(c > 0 for c in caps):
        return Generation([[] for _ in range(R)], [""] * R, [False] * R)
    if seed is None:  # drawn from torch's global RNG, so torch.manual_seed still makes runs repeatable
        seed = int(torch.randint(2 ** 31, ()))
    if isinstance(seed, int):  # row r samples with seed + r; a list gives each prompt its own base seed
        seed = [seed + i * samples for i in range(len(seqs))]
    stops = StopStrings(tokenizer, stop) if stop else None
    rows = []
    for r in range(R):  # row r answers prompt i (its sample j); rows of one prompt share its prefill (key i)
        i, j = divmod(r, samples)
        rows.append(Row(seqs[i], caps[i], key=i, share=samples, temperature=temperature, top_p=top_p,
                        seed=seed[i] + j, stop=stops, tag=r, z=None if zs is None else {n: z[i] for n, z in zs.items()},
                        base=base_rows is not None and bool(base_rows[i])))
    queue = deque(row for row in rows if row.cap > 0)
    engine = Engine(model, tokenizer, max(1, min(slots or R, len(queue))), max(map(len, seqs)) + max(caps),
                    per_row_z=zs is not None, rescale=rescale, embed=embed)
    tty = sys.stderr.isatty()  # a log file gets a line per 30-60 s, not one per decode step
    bar = tqdm(total=len(queue), desc=progress, unit="answer", leave=False, disable=progress is None,
               mininterval=0.1 if tty else 30, maxinterval=10 if tty else 60)
    try:
        while queue or len(engine.slots):
            if queue and engine.free():  # a free slot is filled before the next decode step
                done = engine.admit([queue.popleft() for _ in range(min(engine.free(), len(queue)))])
            else:
                done = engine.step()
            bar.update(len(done))
            for row in done if on_done is not None else ():
                on_done(row.tag, row.ids, row.text, row.cut)
    finally:
        bar.close()
        engine.close()
    return Generation([r.ids for r in rows], [r.text or "" for r in rows], [r.cut for r in rows])


# -----------------------------------------------------------------------------
# Scoring

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
    hp = model.prefill(pids, cache, embed(pids, list(range(len(uniq)))) if embed is not None else None)
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
