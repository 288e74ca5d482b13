"""vlm.py against transformers' LLaVA / LLaVA-NeXT classes and image processors.

Models: tiny random configs saved by transformers (no pretrained VLM ships offline; see
docs/DATA.md). Images: scikit-image's public-domain photos and easy-vqa's images.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import vlm
from generate import Tokenizer

IMAGE_TOKEN = 49151          # last id of SmolLM2's vocabulary stands in for "<image>"
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def photo(name):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image
    arr = getattr(skimage_data, name)()
    return Image.fromarray(arr if arr.ndim == 3 else np.stack([arr] * 3, -1))


def save_tiny(path, kind, smollm2_dir, select="default", layer=-2):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration)
    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=7, projection_dim=16)
    tc = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                     bos_token_id=1, eos_token_id=2, pad_token_id=2)
    common = dict(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN,
                  vision_feature_select_strategy=select, vision_feature_layer=layer)
    if kind == "llava":
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
    else:
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=PINPOINTS, **common))
    model.eval().save_pretrained(path, safe_serialization=True)
    pp = {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}, "resample": 3,
          "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    if kind == "llava_next":
        pp["image_grid_pinpoints"] = PINPOINTS
    (Path(path) / "preprocessor_config.json").write_text(json.dumps(pp))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(smollm2_dir / f, Path(path) / f)
    return model


def hf_processor(kind, size=28, pinpoints=PINPOINTS):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    kw = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if kind == "llava":
        return CLIPImageProcessorPil(**kw)
    return LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints, **kw)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket", "camera"])
def test_clip_preprocessing_matches_transformers_on_real_photos(name):
    im = photo(name)
    ours = vlm.Preprocessor({"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}})(im)
    ref = hf_processor("llava", 336)(im, return_tensors="pt")["pixel_values"]
    assert ours["pixels"].shape == ref.shape == (1, 3, 336, 336)
    torch.testing.assert_close(ours["pixels"], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "rocket"])
def test_anyres_preprocessing_matches_transformers_on_real_photos(name):
    im = photo(name)
    cfg = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
           "image_grid_pinpoints": REAL_PINPOINTS}
    ours = vlm.Preprocessor(cfg)(im)
    ref = hf_processor("llava_next", 336, REAL_PINPOINTS)(im, return_tensors="pt")
    n = ours["pixels"].shape[0]
    assert ours["size"] == tuple(ref["image_sizes"][0].tolist())
    torch.testing.assert_close(ours["pixels"], ref["pixel_values"][0, :n], atol=1e-5, rtol=0)
    assert torch.all(ref["pixel_values"][0, n:] == 0)  # HF pads the tile axis of a batch with zeros


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def tiny_vlm(request, smollm2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny(path, request.param, smollm2_dir)
    return request.param, path, hf


def test_logits_match_transformers(tiny_vlm):
    kind, path, hf = tiny_vlm
    ours = vlm.LLaVA.from_pretrained(path)
    pre = vlm.Preprocessor.from_pretrained(path)
    image = photo("chelsea").resize((70, 40))         # 40x70: NeXT picks a 2-tile grid and unpads
    ids, [im] = vlm.prepare(ours, None, [1, 504, 30, IMAGE_TOKEN, 198, 3300, 314, 253], [image], pre)
    ids_t = torch.tensor([ids])
    got = ours(ids_t, [im])
    kw = {"image_sizes": torch.tensor([im["size"]])} if kind == "llava_next" else {}
    pixels = im["pixels"] if kind == "llava" else im["pixels"][None]
    with torch.no_grad():
        ref = hf(input_ids=ids_t, pixel_values=pixels, **kw).logits
    assert (ids_t == IMAGE_TOKEN).sum() == ours.num_image_tokens(im)
    torch.testing.assert_close(got, ref.float(), atol=1e-4, rtol=1e-4)


def test_greedy_tokens_match_transformers(tiny_vlm, smollm2_dir):
    kind, path, hf = tiny_vlm
    ours = vlm.LLaVA.from_pretrained(path)
    tok = Tokenizer.from_pretrained(path)
    pre = vlm.Preprocessor.from_pretrained(path)
    image = photo("coffee")
    ids, [im] = vlm.prepare(ours, tok, "<image>\nWhat is this?", [image], pre)
    out = vlm.vlm_generate(ours, tok, ["<image>\nWhat is this?"], [[image]], pre, max_new_tokens=20).ids
    kw = {"image_sizes": torch.tensor([im["size"]])} if kind == "llava_next" else {}
    pixels = im["pixels"] if kind == "llava" else im["pixels"][None]
    ref = hf.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=20, do_sample=False,
                      eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id, **kw)[0, len(ids):].tolist()
    assert out[0] == ref[:len(out[0])] and len(out[0]) == len(ref)


def test_feature_layer_list_and_full_strategy(smollm2_dir, tmp_path):
    hf = save_tiny(tmp_path, "llava", smollm2_dir, select="full", layer=[-3, -1])
    ours = vlm.LLaVA.from_pretrained(tmp_path)
    pixels = torch.randn(1, 3, 28, 28)
    im = {"pixels": pixels, "size": (28, 28)}
    ids = torch.tensor([[1, 2] + [IMAGE_TOKEN] * ours.num_image_tokens(im) + [5]])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours(ids, [im]), ref, atol=1e-4, rtol=1e-4)


def test_batched_prompts_with_different_images_and_padding(tiny_vlm):
    """Two prompts of different lengths, one image each, in one batch (and through one slot) = one by one."""
    kind, path, _ = tiny_vlm
    ours = vlm.LLaVA.from_pretrained(path)
    tok = Tokenizer.from_pretrained(path)
    pre = vlm.Preprocessor.from_pretrained(path)
    prompts, images = ["<image>\nWhat shape is it?", "Describe <image> briefly please, in words."], [[photo("coffee")], [photo("rocket")]]
    batch = vlm.vlm_generate(ours, tok, prompts, images, pre, max_new_tokens=8).ids
    assert vlm.vlm_generate(ours, tok, prompts, images, pre, max_new_tokens=8, slots=1).ids == batch
    for p, ims, b in zip(prompts, images, batch):
        one = vlm.vlm_generate(ours, tok, [p], [ims], pre, max_new_tokens=8).ids
        assert one[0] == b


def test_bad_inputs_give_clear_errors(tiny_vlm, tmp_path):
    kind, path, _ = tiny_vlm
    ours = vlm.LLaVA.from_pretrained(path)
    with pytest.raises(ValueError, match="image token"):
        vlm.expand_image_tokens([1, IMAGE_TOKEN, 2], IMAGE_TOKEN, [4, 4])
    with pytest.raises(ValueError, match="no image was given"):
        ours.embed(torch.tensor([[1, IMAGE_TOKEN]]), [])
    cfg = json.loads((path / "config.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "blip"}))
    with pytest.raises(ValueError, match="unsupported model_type 'blip'"):
        vlm.LLaVA.from_pretrained(bad)
    vc = cfg["vision_config"]
    (bad / "config.json").write_text(json.dumps({**cfg, "vision_config": {**vc, "num_hidden_layers": 4}}))
    with pytest.raises(ValueError, match="keys do not match"):
        vlm.LLaVA.from_pretrained(bad)


def test_partial_text_config_takes_transformers_defaults(tmp_path):
    """llava-hf configs store a partial text_config; the rest is LlamaConfig's defaults."""
    from transformers import LlavaConfig
    c = {"model_type": "llava", "image_token_index": 32000,
         "text_config": {"model_type": "llama", "vocab_size": 32064, "rms_norm_eps": 1e-5},
         "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                           "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14}}
    (tmp_path / "config.json").write_text(json.dumps(c))
    ours = vlm.VLMConfig.from_json(tmp_path / "config.json")
    ref = LlavaConfig(**{k: v for k, v in c.items() if k != "model_type"})
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert getattr(ours.text, k) == getattr(ref.text_config, k), k
    assert ours.vision.hidden_act == ref.vision_config.hidden_act == "quick_gelu"
    assert ours.feature_layer == ref.vision_feature_layer == -2
