"""CLIP's vision side of LLaVA: the ViT image tower and the Pillow preprocessing that feeds it.

vlm.py builds LLaVA from these pieces; nothing here knows about language models.

    image ──Preprocessor──> {"pixels": (tiles, 3, H, W), "size": (H, W)} ──VisionTransformer──>
          hidden states (embeddings, after layer 1, ..., after layer L), each (tiles, 1 + patches, D)

  VisionTransformer   a pre-LayerNorm ViT: a stride-`patch_size` convolution cuts the image into
                      patches, a CLS embedding and learned positions are added, then L blocks of
                      bidirectional attention + MLP (quick_gelu). Attribute names are transformers'
                      CLIPVisionModel's, so loading is an identity mapping.
  Preprocessor        the checkpoint's preprocessor_config.json, as transformers' CLIPImageProcessor
                      (resize bicubic, center crop, rescale, normalise) and, for LLaVA-NeXT,
                      LlavaNextImageProcessor's "anyres" tiles: the image fitted into the best of
                      `image_grid_pinpoints`, letterboxed, cut into crop-size tiles, after one
                      resized copy of the whole image.
  select_best_resolution, unpadded_shape
                      the anyres geometry (the same integer arithmetic as transformers), shared by
                      the preprocessor (which pinpoint) and vlm.py (which features are padding).

tests/test_vlm.py compares both against transformers. Run it through vlm.py:

    python vlm.py --model DIR --image photo.jpg "What is in the picture?"
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# transformers' CLIPVisionConfig defaults, for the fields a llava-hf vision_config may leave out
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
# activations by their config name: CLIP's own quick_gelu, the LLaVA projector's gelu
ACTS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class VisionConfig:  # config.json's vision_config, filled with VISION_DEFAULTS
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str


# -----------------------------------------------------------------------------
# CLIP vision tower (attribute names = transformers' CLIPVisionModel)

class VisionEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)

    def forward(self, pixels):                                         # (N, 3, H, W)
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)    # (N, P, D) row-major patches
        cls = self.class_embedding.expand(x.size(0), 1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        D = c.hidden_size
        self.n_head = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = (p(x).view(N, T, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))  # (N, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v)                   # bidirectional: no mask
        return self.out_proj(y.transpose(1, 2).reshape(N, T, D))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = ACTS[c.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = VisionAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = VisionMLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)   # sic: HF's name
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionBlock(c) for _ in range(c.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # pooled output only; LLaVA skips it

    def hidden_states(self, pixels, upto):
        """[embeddings, after layer 1, ..., after layer `upto`] (HF's hidden_states[:upto+1])."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        states = [x]
        for block in self.encoder.layers[:upto]:
            x = block(x)
            states.append(x)
        return states


class CLIPVision(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.vision_model = VisionTransformer(c)


# -----------------------------------------------------------------------------
# LLaVA-NeXT anyres geometry (the same integer arithmetic as transformers)

def select_best_resolution(size, pinpoints):
    """(height, width) of the pinpoint that keeps the most of the image's pixels, then wastes least."""
    H, W = size
    best, best_eff, best_waste = None, -1, float("inf")
    for h, w in pinpoints:
        s = min(w / W, h / H)
        eff = min(int(W * s) * int(H * s), W * H)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def unpadded_shape(h, w, size):
    """Feature-grid (h, w) left after removing the letterbox padding of an image of `size`."""
    H, W = size
    if W / H > w / h:
        pad = (h - int(round(H * (w / W), 7))) // 2
        return h - 2 * pad, w
    pad = (w - int(round(W * (h / H), 7))) // 2
    return h, w - 2 * pad


# -----------------------------------------------------------------------------
# Preprocessing (Pillow + numpy on the CPU; the model sees only the tensors)

class Preprocessor:
    """The checkpoint's preprocessor_config.json: resize (bicubic), center crop, rescale, normalise;
    for LLaVA-NeXT also the anyres tiles. Images are read with Pillow."""

    def __init__(self, cfg: dict, grid_pinpoints=None):
        size = cfg.get("size", {"shortest_edge": 336})
        self.shortest = size.get("shortest_edge") or size.get("height")
        crop = cfg.get("crop_size", {"height": self.shortest, "width": self.shortest})
        self.crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        self.do_crop = cfg.get("do_center_crop", True)
        self.resample = cfg.get("resample", 3)                        # 3 = PIL bicubic
        self.scale = cfg.get("rescale_factor", 1 / 255)
        self.mean = np.array(cfg.get("image_mean", [0.48145466, 0.4578275, 0.40821073]), dtype=np.float32)
        self.std = np.array(cfg.get("image_std", [0.26862954, 0.26130258, 0.27577711]), dtype=np.float32)
        self.grid_pinpoints = cfg.get("image_grid_pinpoints", grid_pinpoints)

    @classmethod
    def from_pretrained(cls, path, grid_pinpoints=None):
        f = Path(path) / "preprocessor_config.json"
        return cls(json.loads(f.read_text()) if f.exists() else {}, grid_pinpoints)

    def _square(self, im):
        """CLIP's path: shortest edge -> `shortest` (aspect kept), center crop, normalise: (3, h, w)."""
        from PIL import Image
        W, H = im.size
        if H <= W:
            new = (int(self.shortest * W / H), self.shortest)
        else:
            new = (self.shortest, int(self.shortest * H / W))
        im = im.resize(new, Image.Resampling(self.resample)) if new != im.size else im
        x = np.asarray(im, dtype=np.float32)
        if self.do_crop:
            ch, cw = self.crop
            top, left = (x.shape[0] - ch) // 2, (x.shape[1] - cw) // 2
            x = x[top:top + ch, left:left + cw]
        return torch.from_numpy(((x * self.scale - self.mean) / self.std).transpose(2, 0, 1).copy())

    def __call__(self, image):
        """A path or PIL image -> {"pixels": (tiles, 3, h, w), "size": (H, W) of the original}."""
        from PIL import Image
        im = image if isinstance(image, Image.Image) else Image.open(image)
        im = im.convert("RGB")
        W, H = im.size
        if not self.grid_pinpoints:
            return {"pixels": self._square(im)[None], "size": (H, W)}
        # anyres: fit into the best pinpoint (aspect kept, ceil), letterbox with black, cut tiles
        bh, bw = select_best_resolution((H, W), self.grid_pinpoints)
        if bw / W < bh / H:
            nh, nw = min(math.ceil(H * bw / W), bh), bw
        else:
            nh, nw = bh, min(math.ceil(W * bh / H), bw)
        canvas = Image.new("RGB", (bw, bh))
        canvas.paste(im.resize((nw, nh), Image.Resampling(self.resample)), ((bw - nw) // 2, (bh - nh) // 2))
        p = self.crop[0]
        tiles = [canvas.crop((j, i, j + p, i + p)) for i in range(0, bh, p) for j in range(0, bw, p)]
        base = im.resize((self.shortest, self.shortest), Image.Resampling(self.resample))
        return {"pixels": torch.stack([self._square(t) for t in [base] + tiles]), "size": (H, W)}
