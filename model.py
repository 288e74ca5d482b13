"""A Llama / Mistral / Qwen2 decoder and its safetensors loader.

This is the base model that Transformer² adapts. Everything else in the repo (svf.py,
reinforce.py, cem.py, dispatch.py) works on the `nn.Linear` modules defined here, whose
attribute names equal Hugging Face's (`model.layers.3.mlp.gate_proj`), so loading a
safetensors checkpoint is an identity mapping checked key by key and shape by shape.

Numerics follow Hugging Face `transformers` (the tests compare against it):
- RMSNorm normalises in float32 and casts back before multiplying by the weight.
- RoPE uses the "half-split" convention (rotate_half: the first and second halves of each
  head are the two coordinates), which is what HF checkpoints expect for q/k weights.
- Llama-3 `rope_scaling` rescales the inverse frequencies by wavelength band.

One forward, `Transformer.hidden(ids, pos, cache)`: the causal mask (`attn_bias`, one per
sliding window, or none at all for a fresh causal batch) and the RoPE tables (`rope`) for the
rows' positions, then the block loop. `attend` calls SDPA in forms that CUDA's fused kernels
(FlashAttention, memory-efficient) accept; `prefill` caps the tokens per forward. Every
row carries its own positions, and the KV cache (`KVCache`) is indexed by them, not by a write
pointer: the token at position p of row b lives in slot p, `update` writes where `pos` says, so
each row advances by its own positions (sequences of different lengths share one cache).

Generation, the tokenizer and scoring live in generate.py (as gpt-fast keeps them apart):
    python generate.py --model checkpoints/smollm2-135m-instruct --prompt "What is 2+2?"
    python tools/bench_model.py    # prefill/decode tok/s vs transformers (`make bench`)
Why past docs/STYLE.md's 300–400 lines: beside the decoder it holds its loader's checks (shards, hub files,
one-line errors) and the attention forms a GPU's fused kernels accept (attn_bias, chunked prefill).
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2")


# -----------------------------------------------------------------------------
# Config

@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None          # Llama-3 style {"rope_type": "llama3", ...}
    attention_bias: bool = False              # Qwen2: q/k/v have a bias
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    layer_windows: list = field(default_factory=list)  # per layer: sliding window or None

    @classmethod
    def from_json(cls, path):
        return cls.from_dict(read_json(path), path)

    @classmethod
    def from_dict(cls, c, path="config"):
        """From a HF config dict (`path` names it in errors)."""
        mt = c.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"{path}: unsupported model_type {mt!r} (supported: {', '.join(SUPPORTED)})")
        # transformers >= 5 writes rope settings under "rope_parameters"; older files use
        # "rope_theta" + "rope_scaling". Accept both.
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{path}: unsupported rope_type {rope_type!r} (supported: default, llama3)")
        L, nh = c["num_hidden_layers"], c["num_attention_heads"]
        # Sliding-window attention: Mistral applies it on every layer; Qwen2 only where
        # layer_types says so (use_sliding_window is off in every released Qwen2 checkpoint).
        window = c.get("sliding_window")
        if mt == "mistral":
            windows = [window] * L
        else:
            types = c.get("layer_types") or ["full_attention"] * L
            windows = [window if t == "sliding_attention" else None for t in types]
        return cls(
            model_type=mt, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_hidden_layers=L,
            num_attention_heads=nh, num_key_value_heads=c.get("num_key_value_heads", nh),
            head_dim=c.get("head_dim") or c["hidden_size"] // nh,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            attention_bias=c.get("attention_bias", mt == "qwen2"),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            layer_windows=windows,
        )


# -----------------------------------------------------------------------------
# Modules (attribute names = Hugging Face's)

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # HF order: normalise in fp32 (fp64 stays fp64, for gradient tests), cast back, then scale.
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig):
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    s = cfg.rope_scaling
    if s:  # Llama 3.1: slow down low frequencies by `factor`, blend the middle band
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        medium = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hd); cos/sin: (B, 1, T, hd). Half-split rotation (HF's rotate_half).
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of every layer for `batch_size` sequences, preallocated.

    The token at position p of row b lives in slot p of row b, so the cache needs no write pointer:
    `update` writes wherever the positions say, and rows advance independently (generate.py's
    engine keeps sequences of different lengths, started at different times, in one cache).
    One tensor per layer, so autograd can flow through writes (generate.completion_hidden).
    """

    def __init__(self, cfg: ModelConfig, batch_size, max_len, dtype, device):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]

    def update(self, layer, k, v, pos):
        """Write k, v (B, nkv, T, hd) of the tokens at positions pos (B, T); return the layer's
        keys and values (B, nkv, max_len, hd). Slots not written yet hold stale values: the
        caller's causal mask hides them (a query at position p sees slots 0..p only)."""
        rows = torch.arange(k.size(0), device=pos.device)[:, None]      # (B, 1)
        self.k[layer][rows, :, pos] = k.transpose(1, 2)                  # [b, :, pos[b, t]] <- (B, T, nkv, hd)
        self.v[layer][rows, :, pos] = v.transpose(1, 2)
        return self.k[layer], self.v[layer]

    def rows(self, start, end):
        """A view of rows start..end-1 (writes go to this cache)."""
        view = object.__new__(KVCache)
        view.k, view.v = [k[start:end] for k in self.k], [v[start:end] for v in self.v]
        return view

    def gather(self, index):
        """A new cache whose row i is a copy of row index[i] (differentiable: a prompt's keys
        and values shared by several completions, generate.completion_hidden)."""
        new = object.__new__(KVCache)
        new.k, new.v = [k[index] for k in self.k], [v[index] for v in self.v]
        return new

    def copy_row(self, src, dst, n, source=None):
        """Slots 0..n-1 of row `src` (of `source`, default this cache) into row `dst`."""
        source = source or self
        for ks, vs, kd, vd in zip(source.k, source.v, self.k, self.v):
            kd[dst, :, :n] = ks[src, :, :n]
            vd[dst, :, :n] = vs[src, :, :n]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, pos, cos, sin, bias, cache):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)   # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            S = T if bias is None else bias.size(-1)                     # slots 0..S-1 can be seen
            k, v = cache.update(self.layer_idx, k, v, pos)
            k, v = k[:, :, :S], v[:, :, :S]                              # (B, nkv, S, hd)
        y = attend(q, k, v, bias)                                        # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hd)           # (B, T, C)
        return self.o_proj(y)


def attend(q, k, v, bias):
    """softmax(q·kᵀ/√hd + bias)·v for q (B, nh, T, hd), k and v (B, nkv, S, hd); query head h reads
    K/V head h // rep (GQA, rep = nh/nkv). The obvious call, a boolean mask with enable_gqa, suits
    none of CUDA's fused kernels (FlashAttention takes no mask, memory-efficient attention no GQA):
    the math backend then repeats K/V per head and keeps B·nh·T·S fp32 scores for the backward.
    - bias None (the keys are the queries' own tokens at 0..T-1): is_causal + enable_gqa, the form
      FlashAttention takes in fp16/bf16 (the GPU default; an fp32 GQA model gets the math backend).
    - bias (B, 1, rep·T, S) from `attn_bias`: the rep query heads sharing a K/V head are folded into
      the query axis, q (B, nkv, rep·T, hd), so head counts match and memory-efficient attention
      takes the mask. K/V are never copied (a decode step's q is just (B, nkv, rep, hd)).
    tests/test_model.py holds every call the model makes to those kernels' documented conditions."""
    B, nh, T, hd = q.shape
    nkv = k.size(1)
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh)
    qg = q.reshape(B, nkv, nh // nkv * T, hd)  # (B, nkv, rep·T, hd): group j, row g·T + t = head j·rep + g, query t
    y = F.scaled_dot_product_attention(qg, k, v, attn_mask=bias)  # (B, nkv, rep·T, hd)
    return y.reshape(B, nh, T, hd)             # (B, nh, T, hd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, pos, cos, sin, bias, cache):
        x = x + self.self_attn(self.input_layernorm(x), pos, cos, sin, bias, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """HF's `model.` prefix: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def causal_mask(q_pos, k_pos, window=None):
    """(B, 1, T, S) True where query at position q_pos (B, T) may see key at k_pos (B or 1, S):
    not in its future and, with a sliding window, fewer than `window` positions back.
    Every query sees at least its own key, so no softmax row is empty."""
    d = q_pos[:, :, None] - k_pos[:, None, :]                           # (B, T, S) distance back
    m = d >= 0
    if window is not None:
        m = m & (d < window)
    return m.unsqueeze(1)


def attn_bias(q_pos, k_pos, window, rep, dtype):
    """`causal_mask` as the additive bias `attend` takes: 0 where seen, -inf where hidden, its rows
    repeated for the rep query heads that share a K/V head: (B, 1, rep·T, S), row g·T + t = query t.
    Built once per forward and shared by every layer with this window."""
    m = causal_mask(q_pos, k_pos, window)                               # (B, 1, T, S) bool
    bias = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))
    return bias.repeat(1, 1, rep, 1)                                    # (B, 1, rep·T, S)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        # Which layers use which sliding window; layers sharing a window share a mask.
        self.windows = sorted(set(cfg.layer_windows), key=lambda w: w or 0)
        # Tokens (rows × positions) per forward in `prefill`: bounds its transient memory (MLP
        # intermediates, the mask) however long or many the prompts. 8192 tokens of Llama-3-8B
        # in bf16: ~0.7 GB of MLP activations per layer, freed before the next.
        self.max_prefill_tokens = 8192

    def rope(self, pos, dtype):
        """cos, sin (B, 1, T, hd) for positions pos (B, T)."""
        freqs = pos[:, :, None].float() * self.inv_freq                   # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                   # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden(self, input_ids, pos=None, cache=None, embeds=None, kv_len=None):
        """Final-normed hidden states (B, T, C) of the tokens input_ids (B, T) at positions pos (B, T).

        Every row keeps its own positions 0, 1, 2, ...: a batch of sequences of different lengths
        is right-padded, and causality alone hides the padding (it comes after every real token
        of its row). pos defaults to 0..T-1 for every row. Without a cache the keys are these T
        tokens; with one, their keys/values are written at `pos` and each query attends to the
        cache's slots up to its own position (so a row can continue where it left off).
        embeds (B, T, C), when given, replaces the token embeddings (vlm.py splices images in).
        kv_len: with a cache, how many of its slots to attend over (one past the furthest position
        written now) when the caller knows it; otherwise it is read from pos, a host sync per call.
        """
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids) if embeds is None else embeds
        rep = self.config.num_attention_heads // self.config.num_key_value_heads
        if pos is None:  # keys = these T tokens at 0..T-1 (cached or not): causal needs no mask
            pos = torch.arange(T, device=input_ids.device).expand(B, T)
            # ...unless a sliding window is shorter than the sequence
            biases = {w: None if w is None or T <= w else attn_bias(pos, pos, w, rep, x.dtype) for w in self.windows}
        else:
            if cache is None:
                k_pos = pos
            else:  # slots 0..S-1 of the cache, S = one past the furthest position written now
                k_pos = torch.arange(kv_len or int(pos.max()) + 1, device=pos.device)[None]
            biases = {w: attn_bias(pos, k_pos, w, rep, x.dtype) for w in self.windows}
        cos, sin = self.rope(pos, x.dtype)
        for block, w in zip(self.model.layers, self.config.layer_windows):
            x = block(x, pos, cos, sin, biases[w], cache)
        return self.model.norm(x)

    def prefill(self, input_ids, cache, embeds=None):
        """`hidden(input_ids, None, cache, embeds)` for a fresh batch (every row at positions
        0..T-1), run as chunks of at most `max_prefill_tokens` tokens (B rows × T/n positions):
        chunk c writes its keys/values at its positions and attends to the cache's slots up to
        its own, so the result equals one forward while no forward is larger than the cap
        (long prompts, many rows: a LLaVA-NeXT batch is 64 × ~2.9k tokens). Returns (B, T, C).

        Under autograd it is one forward: a later chunk's cache write would change the keys an
        earlier chunk saved for its backward, and the backward keeps every token's activations
        anyway (training bounds its tokens with the micro-batch instead)."""
        B, T = input_ids.shape
        step = T if torch.is_grad_enabled() else max(1, self.max_prefill_tokens // B)
        if step >= T:
            return self.hidden(input_ids, None, cache, embeds)
        pos = torch.arange(T, device=input_ids.device).expand(B, T)
        chunks = [slice(a, a + step) for a in range(0, T, step)]
        return torch.cat([self.hidden(input_ids[:, c], pos[:, c], cache, None if embeds is None else embeds[:, c])
                          for c in chunks], dim=1)                         # (B, T, C)

    def forward(self, input_ids, pos=None, cache=None, embeds=None):
        """Logits (B, T, vocab) in float32."""
        return self.lm_head(self.hidden(input_ids, pos, cache, embeds)).float()

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=torch.float32, device="cpu"):
        path = resolve_checkpoint(path_or_repo_id)
        cfg = ModelConfig.from_json(path / "config.json")
        model = cls.from_state(cfg, load_safetensors(path), path, dtype)
        model.name_or_path = str(path_or_repo_id)
        return model.to(device)

    @classmethod
    def from_state(cls, cfg, state, path, dtype=torch.float32):
        """Build from a state dict with HF key names, checked key by key and shape by shape."""
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: p for k, p in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            expected.pop("lm_head.weight")
            state.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
        load_checked(model, expected, state, path, cfg.model_type, dtype)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(cfg)  # buffers built on "meta" must be rebuilt
        return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Loading

# What a hub download fetches: exactly the Hugging Face layout this loader reads. Hub repos often ship
# more: Mistral's consolidated.safetensors (the same 14.5 GB again in Mistral's own layout), Llama's
# original/ folder (consolidated.00.pth, params.json), READMEs. Glob patterns as `fnmatch` reads them
# (huggingface_hub.utils.filter_repo_objects): "model-*" matches the shards, not original/ files.
HUB_FILES = ("config.json", "generation_config.json",                       # the model's config
             "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",  # weights
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",  # generate.Tokenizer
             "chat_template.jinja", "chat_template.json",                    # templates (generate.py)
             "preprocessor_config.json")                                     # LLaVA's image preprocessing


def resolve_checkpoint(path_or_repo_id) -> Path:
    """A local HF folder, or a hub repo id whose HUB_FILES are downloaded (or found in the hub cache).
    A failed download is one error that says why: gated, not found / not logged in, or offline."""
    p = Path(path_or_repo_id)
    if p.is_dir():
        return p
    rid = str(path_or_repo_id)
    if p.exists() or rid.count("/") != 1:
        raise FileNotFoundError(f"{rid}: not a model folder (expected config.json + model.safetensors)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        return Path(snapshot_download(rid, allow_patterns=list(HUB_FILES)))
    # The order matters: a gated repo's error is a kind of RepositoryNotFoundError.
    except GatedRepoError as e:
        why, err = (f"a gated repository: accept its license at https://huggingface.co/{rid}, then log in "
                    f"(`hf auth login`, or set HF_TOKEN)"), e
    except RepositoryNotFoundError as e:  # the hub answers 404 to a private repo without a token, too
        why, err = "no such repository on the hub, or a private one and you are not logged in", e
    except LocalEntryNotFoundError as e:  # offline (or HF_HUB_OFFLINE=1) and not in the local cache
        why, err = ("not in the local hub cache and the hub is unreachable; download it elsewhere and pass "
                    "the folder, or run `make model` for the shipped one"), e
    except (OSError, ValueError) as e:  # any other HTTP status, a full disk, an invalid repo id
        why, err = "the hub download failed", e
    detail = str(err).strip().splitlines()
    raise OSError(f"{rid}: not a local folder; {why} ({type(err).__name__}: {detail[-1] if detail else ''})") from None


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read config ({e})") from None


def load_checked(model, expected, state, path, what, dtype):
    """Assign `state` to a meta-device `model` after checking it against `expected` (name ->
    parameter) key by key and shape by shape; any mismatch is one error naming it."""
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint keys do not match {what} "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    for k, p in expected.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise ValueError(f"{path}: {k} has shape {tuple(state[k].shape)}, config says {tuple(p.shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)


def save_folder(model, src, out, replace=False):
    """Write `model`'s current weights as an HF folder `out`: one model.safetensors plus every other
    file (config, generation config, tokenizer) of the checkpoint `src` it was loaded from, a folder
    or a hub id. svf.py / lora.py `merge` call it with an adapter merged in: a plain model anyone can load.
    Only the new weights go in: a base shard, its index or a .bin/.pth copy of `src` next to them
    would let a loader that follows the index or globs *.safetensors pick up the base weights.
    The folder is built under a temp name beside `out` and renamed at the end, so a killed merge
    never leaves a loadable half-folder, and the next run removes the orphan. An existing `out` is
    refused unless replace=True (the scripts' --force), and even then only a model folder is replaced."""
    import os
    import shutil
    from safetensors.torch import save_file
    src, out = resolve_checkpoint(src), Path(out)  # a hub id: resolved before anything is written
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: --out must be a new folder, not the base model's")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not replace:
            raise FileExistsError(f"{out}: already exists; pick another output or pass --force to go on")
        if not (out / "config.json").is_file():
            raise FileExistsError(f"{out}: exists and is not a model folder (no config.json); not replacing it")
    remove_orphans(out.parent, f".{out.name}.tmp*")
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")  # safetensors refuses shared tensors; HF re-ties on load
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        for f in src.iterdir():  # everything but weights (and weight indexes); sub-folders neither
            if f.is_file() and not (f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json")):
                shutil.copy2(f, tmp / f.name)  # follows the hub cache's symlinks: real files
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; removed on an error


WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".msgpack", ".h5"}


def load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for name in files:
        f = path / name
        if not f.exists():
            raise FileNotFoundError(f"{f}: missing weights file")
        try:
            state.update(load_file(f))
        except Exception as e:  # truncated or corrupt files raise various safetensors errors
            raise ValueError(f"{f}: cannot read safetensors ({e})") from None
    return state


# -----------------------------------------------------------------------------
# Small helpers that svf.py, lora.py and svd_cache.py share

def replace_module(model, path, new):
    """Put module `new` at `path` (e.g. "model.layers.0.mlp.up_proj") and return the one it replaces:
    svf.py and lora.py swap their layers in with it, and back out with the module it returned."""
    parent, _, child = path.rpartition(".")
    owner = model.get_submodule(parent)
    old = getattr(owner, child)
    setattr(owner, child, new)
    return old


def remove_orphans(folder, pattern="*.tmp*"):
    """Delete temp files and folders `<name>.tmp<pid>` in `folder` whose process is gone: what a
    kill -9 leaves of cli.atomic_write or save_folder (a merge of SmolLM2 leaves 538 MB).
    A live process's temp, this one's included, is left alone."""
    import os
    import shutil
    for p in Path(folder).glob(pattern):
        pid = p.name.rpartition(".tmp")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
            continue
        except ProcessLookupError:
            pass
        except PermissionError:  # another user's live process
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
