"""LLaVA: a CLIP vision tower and a projector in front of model.py's language model; the entry
point for vision-language checkpoints.

The paper applies SVF to Llama3-LLaVA-NeXT-8B's language model (TextVQA training, OKVQA
transfer). Here the vision side is written out and the language side is model.py's
`Transformer`, reused as is, so svf.py / reinforce.py adapt it exactly like a text model.

    image ──preprocess──> pixels (tiles, 3, H, W) ──CLIP ViT──> patch features (layer -2, CLS dropped)
          ──projector (linear-GELU-linear)──> image embeddings, spliced into the prompt's token
          embeddings where the prompt holds the image token ──> Transformer ──> logits

LLaVA-1.5 sees one center-cropped square. LLaVA-NeXT ("anyres") also tiles the image at the
best of `image_grid_pinpoints`: features = [whole image resized] + [tiles laid back out on
their grid, the padding cropped off, one `image_newline` embedding closing every row].

Loads the llava-hf safetensors layout (`language_model.model.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`, `image_newline`) and the layout transformers >= 5 saves
(`model.language_model.*`, `model.vision_tower.*`, `lm_head`). Numerics follow transformers'
LLaVA / CLIP / image-processor classes; tests/test_vlm.py compares against them.

Files: clip.py holds the vision side (the CLIP ViT tower, the Pillow preprocessing and the anyres
geometry); this file holds the rest: config, projector, `LLaVA` (features, splicing, loading), the
anyres packing of tile features, prompts with images (`prepare`, `prompts_with_images`),
`vlm_generate` and the CLI. Everything clip.py defines that callers use is importable from here
too (vlm.Preprocessor, vlm.select_best_resolution, ...).

    python vlm.py --model DIR --image photo.jpg "What is in the picture?"
    python -m evals --task easy_vqa --model DIR --limit 100    # VQA accuracy (evals/vqa.py)
    python reinforce.py --task easy_vqa --model DIR --out runs/vqa --wrong-reward -0.1
Why past docs/STYLE.md's 200–300 lines: LLaVA-1.5 and LLaVA-NeXT (any-resolution tiling and its unpadding)
share this one file, with transformers' config defaults.
"""
import argparse
import contextlib
import json
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

import cli
from clip import ACTS, VISION_DEFAULTS, CLIPVision, Preprocessor, VisionConfig, select_best_resolution, unpadded_shape
from generate import Tokenizer, generate
from model import ModelConfig, Transformer, load_checked, load_safetensors, read_json, resolve_checkpoint

# transformers' defaults for fields a llava-hf config.json may leave out (its text_config is
# often partial: llava-1.5-7b-hf stores 8 keys and relies on LlamaConfig's defaults).
TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6, sliding_window=4096,
                    max_position_embeddings=32768),
}

# What transformers' LlavaConfig / LlavaNextConfig take when config.json has no vision_config: the
# CLIP ViT-L/14 at 336 px of every released LLaVA-1.5 / NeXT (not CLIPVisionConfig's own ViT-B/32
# defaults, which fill the fields a vision_config that is present leaves out), and LLaVA-NeXT's
# anyres resolutions (height, width) when it has no image_grid_pinpoints.
LLAVA_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14)
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


# -----------------------------------------------------------------------------
# Config

@dataclass
class VLMConfig:
    model_type: str                 # "llava" (1.5) or "llava_next"
    vision: VisionConfig
    text: ModelConfig
    image_token_id: int
    feature_layer: int | list       # hidden state(s) of the vision tower fed to the projector
    select: str                     # "default": drop the CLS feature; "full": keep it
    projector_act: str
    projector_bias: bool
    grid_pinpoints: list | None     # LLaVA-NeXT tiling resolutions, (height, width)

    @classmethod
    def from_json(cls, path):
        c = read_json(path)
        mt = c.get("model_type")
        if mt not in ("llava", "llava_next"):
            raise ValueError(f"{path}: unsupported model_type {mt!r} (vlm.py reads llava, llava_next)")
        vc = c.get("vision_config") or LLAVA_VISION
        vc = {**VISION_DEFAULTS, **{k: v for k, v in vc.items() if k in VISION_DEFAULTS}}
        if vc["hidden_act"] not in ACTS:
            raise ValueError(f"{path}: unsupported vision activation {vc['hidden_act']!r}")
        tc = dict(c.get("text_config") or {"model_type": "llama"})
        tc.setdefault("model_type", "llama")
        tc = {**TEXT_DEFAULTS.get(tc["model_type"], {}), **tc}
        token = c.get("image_token_id", c.get("image_token_index"))
        if token is None:
            raise ValueError(f"{path}: no image_token_id / image_token_index")
        return cls(model_type=mt, vision=VisionConfig(**vc), text=ModelConfig.from_dict(tc, f"{path} text_config"),
                   image_token_id=int(token), feature_layer=c.get("vision_feature_layer", -2),
                   select=c.get("vision_feature_select_strategy", "default"),
                   projector_act=c.get("projector_hidden_act", "gelu"),
                   projector_bias=c.get("multimodal_projector_bias", True),
                   grid_pinpoints=c.get("image_grid_pinpoints") or LLAVA_NEXT_PINPOINTS if mt == "llava_next" else None)


# -----------------------------------------------------------------------------
# LLaVA

class Projector(nn.Module):
    """CLIP features (width D, several layers concatenated) -> the language model's width C."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        n_layers = 1 if isinstance(cfg.feature_layer, int) else len(cfg.feature_layer)
        D, C = cfg.vision.hidden_size, cfg.text.hidden_size
        self.linear_1 = nn.Linear(D * n_layers, C, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(C, C, bias=cfg.projector_bias)
        self.act = ACTS[cfg.projector_act]

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))

class LLaVA(nn.Module):
    def __init__(self, cfg: VLMConfig, language_model: Transformer):
        super().__init__()
        self.config = cfg
        self.vision_tower = CLIPVision(cfg.vision)
        self.multi_modal_projector = Projector(cfg)
        self.language_model = language_model
        if cfg.model_type == "llava_next":
            self.image_newline = nn.Parameter(torch.zeros(cfg.text.hidden_size))

    def patch_features(self, pixels):
        """pixels (N, 3, H, W) -> projected features (N, P, C) of the configured layer(s)."""
        layers = [self.config.feature_layer] if isinstance(self.config.feature_layer, int) else self.config.feature_layer
        L = self.config.vision.num_hidden_layers
        idx = [l % (L + 1) for l in layers]                            # -2 -> L-1: the penultimate layer
        states = self.vision_tower.vision_model.hidden_states(pixels, max(idx))
        x = torch.cat([states[i] for i in idx], dim=-1)
        if self.config.select == "default":
            x = x[:, 1:]                                               # drop the CLS position
        return self.multi_modal_projector(x)

    def image_features(self, image):
        """One preprocessed image (see `Preprocessor`) -> its embeddings (n_tokens, C)."""
        w = self.multi_modal_projector.linear_1.weight
        pixels = image["pixels"].to(w.device, self.image_dtype)       # preprocessing happens on the CPU
        feats = self.patch_features(pixels)                            # (tiles, P, C)
        if self.config.model_type == "llava":
            return feats[0]
        return pack_anyres(feats, image["size"], self.config, self.image_newline)

    @property
    def image_dtype(self):
        return self.multi_modal_projector.linear_1.weight.dtype

    def embed(self, ids, images):
        """ids (B, T) whose image tokens are already expanded (`expand_image_tokens`) ->
        input embeddings with the images' features in place of those tokens, in order."""
        x = self.language_model.model.embed_tokens(ids)
        slots = ids == self.config.image_token_id
        if images:
            feats = torch.cat([self.image_features(im) for im in images]).to(x.dtype)
            if int(slots.sum()) != feats.size(0):
                raise ValueError(f"prompts hold {int(slots.sum())} image tokens, images give {feats.size(0)} features")
            x = x.masked_scatter(slots[..., None], feats)
        elif slots.any():
            raise ValueError("prompt holds image tokens but no image was given")
        return x

    def forward(self, ids, images, pos=None):
        """Logits (B, T, vocab) for expanded ids (B, T) and their images (list, in order)."""
        return self.language_model(ids, pos, embeds=self.embed(ids, images))

    def num_image_tokens(self, image):
        """How many embeddings `image_features` returns for this preprocessed image."""
        c = self.config
        side = c.vision.image_size // c.vision.patch_size
        per_tile = side * side + (c.select == "full")
        if c.model_type == "llava":
            return per_tile
        gh, gw = (r // c.vision.image_size for r in select_best_resolution(image["size"], c.grid_pinpoints))
        h, w = unpadded_shape(gh * side, gw * side, image["size"])
        return per_tile + h * (w + 1)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=torch.float32, device="cpu"):
        path = resolve_checkpoint(path_or_repo_id)
        cfg = VLMConfig.from_json(path / "config.json")
        state = {_our_key(k): v for k, v in load_safetensors(path).items() if not k.endswith("position_ids")}
        lm_state = {k[len("language_model."):]: state.pop(k) for k in list(state) if k.startswith("language_model.")}
        lm = Transformer.from_state(cfg.text, lm_state, path, dtype)
        with torch.device("meta"):
            model = cls(cfg, nn.Module())
        load_checked(model, dict(model.state_dict()), state, path, cfg.model_type, dtype)
        model.language_model = lm
        model.name_or_path = str(path_or_repo_id)
        return model.to(device).eval().requires_grad_(False)


def _our_key(k):
    """Any of the saved LLaVA layouts -> the llava-hf hub layout (this module's attribute names).
    Hub: language_model.model.*, language_model.lm_head, vision_tower.vision_model.*;
    transformers >= 5 in memory: model.language_model.*, lm_head, model.vision_tower.*;
    transformers >= 5 on disk: the hub names, but CLIP without the vision_model level."""
    if k.startswith("model.language_model."):
        k = "language_model.model." + k[len("model.language_model."):]
    elif k == "lm_head.weight":
        k = "language_model.lm_head.weight"
    elif k.startswith("model."):
        k = k[len("model."):]
    if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
        k = "vision_tower.vision_model." + k[len("vision_tower."):]
    return k


# -----------------------------------------------------------------------------
# LLaVA-NeXT: the tiles' features laid back out on their grid (geometry: clip.py)

def pack_anyres(feats, size, cfg: VLMConfig, newline):
    """(1 + tiles, P, C) tile features -> (n_tokens, C): base image, then the tiles' grid, unpadded,
    with `newline` after every row."""
    base, tiles = feats[0], feats[1:]
    side = cfg.vision.image_size // cfg.vision.patch_size
    gh, gw = (r // cfg.vision.image_size for r in select_best_resolution(size, cfg.grid_pinpoints))
    C = tiles.size(-1)
    grid = tiles.view(gh, gw, side, side, C).permute(4, 0, 2, 1, 3).reshape(C, gh * side, gw * side)
    h, w = unpadded_shape(gh * side, gw * side, size)
    top, left = (gh * side - h) // 2, (gw * side - w) // 2
    grid = grid[:, top:top + h, left:left + w]
    grid = torch.cat([grid, newline.to(grid.dtype)[:, None, None].expand(C, h, 1)], dim=2)  # (C, h, w+1)
    return torch.cat([base, grid.flatten(1).T])


# -----------------------------------------------------------------------------
# Images and prompts

def is_vlm(path_or_repo_id) -> bool:
    """Whether a checkpoint folder holds a LLaVA (vlm.py) rather than a text model (model.py)."""
    try:
        config = resolve_checkpoint(path_or_repo_id) / "config.json"
        return json.loads(config.read_text()).get("model_type") in ("llava", "llava_next")
    except (OSError, ValueError, RuntimeError):
        return False


def load(path_or_repo_id, device="cpu", dtype=torch.float32):
    """(LLaVA, Tokenizer, Preprocessor) of a checkpoint folder."""
    model = LLaVA.from_pretrained(path_or_repo_id, dtype=dtype, device=device)
    pre = Preprocessor.from_pretrained(resolve_checkpoint(path_or_repo_id), model.config.grid_pinpoints)
    return model, Tokenizer.from_pretrained(path_or_repo_id), pre


def expand_image_tokens(ids, image_token_id, counts):
    """One image token per image -> `counts[i]` copies for image i (in order of appearance)."""
    out, k = [], 0
    for t in ids:
        if t == image_token_id:
            if k >= len(counts):
                raise ValueError(f"prompt holds more image tokens than the {len(counts)} image(s) given")
            out += [t] * counts[k]
            k += 1
        else:
            out.append(t)
    if k != len(counts):
        raise ValueError(f"prompt holds {k} image token(s) for {len(counts)} image(s)")
    return out


def prepare(vlm, tokenizer, prompt, images, preprocess):
    """A prompt (string with one "<image>" per image, or id list) and its images -> (expanded ids, processed images)."""
    tid = vlm.config.image_token_id
    if isinstance(prompt, str):
        parts = prompt.split("<image>")
        ids = tokenizer.encode(parts[0])
        for part in parts[1:]:  # encode around the marker: the image token need not be in the vocabulary
            ids += [tid] + tokenizer.encode(part)[_bos_len(tokenizer):]
    else:
        ids = list(prompt)
    processed = [preprocess(im) for im in images]
    return expand_image_tokens(ids, tid, [vlm.num_image_tokens(im) for im in processed]), processed


def _bos_len(tokenizer):
    """Tokens the tokenizer prepends to every encode (a BOS), skipped on continuation pieces."""
    return len(tokenizer.encode(""))


def vqa_prompt(tokenizer, question):
    """A user turn through the checkpoint's chat template when it has one, else LLaVA-1.5's format."""
    if tokenizer.template:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}])
    return f"USER: {question} ASSISTANT:"


def prompts_with_images(vlm, tokenizer, prompts, images, preprocess):
    """Prompts (strings) and their images (images[i]: the list for prompts[i]) -> (id lists with the
    image tokens expanded, embed): embed(ids, prompt indices) splices those prompts' images into the
    token embeddings, the hook generate.generate and generate.completion_hidden take."""
    seqs, processed = [], []
    for p, ims in zip(prompts, images):
        ids, pre = prepare(vlm, tokenizer, p, ims, preprocess)
        seqs.append(ids)
        processed.append(pre)
    return seqs, lambda ids, rows: vlm.embed(ids, [im for i in rows for im in processed[i]])


@torch.inference_mode()
def vlm_generate(vlm, tokenizer, prompts, images, preprocess, **kw):
    """generate.generate for prompts with images: images[i] is the list of images of prompts[i]."""
    seqs, embed = prompts_with_images(vlm, tokenizer, prompts, images, preprocess)
    return generate(vlm.language_model, tokenizer, seqs, embed=embed, **kw)


# -----------------------------------------------------------------------------
# CLI

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="question about the --image(s)")
    p.add_argument("--model", required=True, help="llava-hf layout folder (config.json, *.safetensors, tokenizer, preprocessor_config.json)")
    p.add_argument("--image", action="append", required=True, help="image file (repeat for several)")
    p.add_argument("--expert", help="SVF expert (.safetensors) applied to the language model")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    cli.add_device_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = cli.device_and_dtype(args)
    vlm, tok, pre = load(args.model, device=device, dtype=dtype)
    ctx = contextlib.nullcontext()
    if args.expert:
        import svf  # the expert adapts the language model's matrices, merged once
        ctx = svf.merged(vlm.language_model, args.expert)
    with ctx:
        prompt = args.prompt if "<image>" in args.prompt else "<image>\n" * len(args.image) + args.prompt
        t0 = time.time()
        g = vlm_generate(vlm, tok, [vqa_prompt(tok, prompt)], [args.image], pre, max_new_tokens=args.max_new_tokens)
        print(g.texts[0])
        print(f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    cli.run(main)
