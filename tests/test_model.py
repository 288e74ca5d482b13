"""model.py against Hugging Face transformers (the independent reference).

Tiny random Llama (GQA + Llama-3 rope scaling), Mistral (sliding window) and Qwen2 (q/k/v
bias) checkpoints are built with transformers, saved as safetensors, and loaded by our
code; then the real converted SmolLM2 folder is checked the same way.
"""
import json
import shutil

import pytest
import torch

from generate import Tokenizer, generate, score
from model import KVCache, ModelConfig, Transformer

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    return {
        "llama": LlamaConfig(**TINY, rope_theta=5e5, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32)),
        "llama_tied": LlamaConfig(**TINY, tie_word_embeddings=True),
        "mistral": MistralConfig(**TINY, sliding_window=8),
        "qwen2": Qwen2Config(**TINY, tie_word_embeddings=False),
    }


@pytest.fixture(scope="module", params=list(tiny_configs()))
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = tiny_configs()[request.param]
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    if request.param == "qwen2":  # make sure the q/k/v biases are non-zero
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return request.param, path, hf


def test_logits_match_transformers(tiny):
    name, path, hf = tiny
    ours = Transformer.from_pretrained(path)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == (2, 40, 300) and got.dtype == torch.float32
    assert (got - ref).abs().max() < 1e-4, name


def test_greedy_tokens_match_transformers(tiny):
    name, path, hf = tiny
    ours = Transformer.from_pretrained(path)
    prompt = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                      max_new_tokens=32, min_new_tokens=32, pad_token_id=0)[0, 12:].tolist()

    class NoStop:  # random weights emit eos at random; compare 32 full tokens
        pad_id, eos_ids = 0, [-1]

        def decode(self, ids):
            return ""
    got = generate(ours, NoStop(), [prompt[0].tolist()], max_new_tokens=32).ids
    assert got[0] == ref, name


def test_batch_equals_one_by_one(tiny):
    name, path, _ = tiny
    ours = Transformer.from_pretrained(path)

    class NoStop:
        pad_id, eos_ids = 0, [-1]

        def decode(self, ids):
            return ""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 17, 11)]
    batch = generate(ours, NoStop(), prompts, max_new_tokens=12).ids
    single = [generate(ours, NoStop(), [p], max_new_tokens=12).ids[0] for p in prompts]
    assert batch == single, name
    # and with fewer slots than prompts: rows wait, then take the first free slot
    assert generate(ours, NoStop(), prompts, max_new_tokens=12, slots=2).ids == single, name


def test_score_equals_log_softmax_sums(tiny):
    name, path, _ = tiny
    ours = Transformer.from_pretrained(path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (6, 9)]
    comps = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (4, 7)]
    total, tok, mask = score(ours, prompts, comps)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        logp = ours(torch.tensor([p + c])).log_softmax(-1)[0]
        ref = sum(logp[len(p) - 1 + j, c[j]] for j in range(len(c)))
        assert abs(total[i] - ref) < 1e-4
        assert mask[i].sum() == len(c)


def test_sliding_window_is_used():
    cfg = ModelConfig(model_type="mistral", vocab_size=10, hidden_size=8, intermediate_size=8,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                      layer_windows=[3])
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    ids = torch.randint(0, 10, (1, 8))
    ids2 = ids.clone()
    ids2[0, 0] = (ids[0, 0] + 1) % 10  # outside the window of the last token
    with torch.no_grad():
        assert torch.allclose(m(ids)[0, -1], m(ids2)[0, -1])
        assert not torch.allclose(m(ids)[0, 2], m(ids2)[0, 2])


# ---------------------------------------------------------------- bad input

def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json: unsupported model_type 'gpt2'"):
        Transformer.from_pretrained(tmp_path)


def test_missing_weights_file(tiny, tmp_path):
    _, path, _ = tiny
    shutil.copy(path / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"model.safetensors: missing weights file"):
        Transformer.from_pretrained(tmp_path)


def test_truncated_safetensors(tiny, tmp_path):
    _, path, _ = tiny
    shutil.copy(path / "config.json", tmp_path / "config.json")
    data = (path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: cannot read safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_wrong_shape(tiny, tmp_path):
    _, path, _ = tiny
    for f in path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(96, 64\), config says \(128, 64\)"):
        Transformer.from_pretrained(tmp_path)


def test_offline_repo_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not a local folder; not in the local hub cache and the hub is unreachable"):
        Transformer.from_pretrained("someone/no-such-model-here")


# ---------------------------------------------------------------- the real shipped model

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "2+3="]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return Transformer.from_pretrained(smollm2_dir), Tokenizer.from_pretrained(smollm2_dir)


def test_smollm2_logits_match_transformers(smollm2, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = smollm2
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    for p in PROMPTS:
        msgs = [{"role": "user", "content": p}]
        ref_ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
        ids = tok.encode(tok.apply_chat_template(msgs))
        assert ids == list(ref_ids)
        assert ids.count(1) == ids.count(tok.tk.token_to_id("<|im_start|>"))  # no extra BOS
        with torch.no_grad():
            diff = (model(torch.tensor([ids])) - hf(torch.tensor([ids])).logits).abs().max()
        assert diff < 1e-3, (p, float(diff))


def test_smollm2_knows_paris(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    texts = generate(model, tok, [prompt], max_new_tokens=24).texts
    assert "Paris" in texts[0]


def test_smollm2_stop_strings_and_eos(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "Count from 1 to 20, separated by commas."}])
    ids, texts, cut = generate(model, tok, [prompt, prompt], max_new_tokens=60, stop=["5"])
    assert cut == [False, False]
    assert texts[0] == texts[1] and "5" not in texts[0] and "4" in texts[0]
    assert "5" in tok.decode(ids[0])  # the ids keep the token that completed the stop string


# ---------------------------------------------------------------- attention on CUDA's fused kernels
# Issue 36 §2.1: on a GPU, SDPA runs FlashAttention or memory-efficient attention only for calls
# that meet their conditions; anything else falls to the math backend (scores B·nh·T·S upcast and
# kept for the backward, K/V repeated per head). torch's own judges, torch.backends.cuda.
# can_use_flash_attention / can_use_efficient_attention(SDPAParams), answer False for everything
# on a CPU-only build (flash and mem-efficient are not compiled in), so below is a port of the
# conditions that matter here, from aten/src/ATen/native/transformers/sdp_utils_cpp.h and
# cuda/sdp_utils.cpp (sm80+), and SDPA's note "GQA works only for Flash_attention and math".
# On a GPU, every call the port accepts must be accepted by torch's own judges too.

def fused_backends(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False):
    """The fused CUDA SDPA kernels that would take this call: a subset of {"flash", "efficient"}."""
    common = (q.dim() == k.dim() == v.dim() == 4 and dropout_p == 0.0
              and q.size(0) == k.size(0) == v.size(0)                          # same batch, no broadcast
              and q.size(-2) > 0 and k.size(-2) > 0                            # no empty sequence
              and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1            # last dim contiguous
              and (attn_mask is None or attn_mask.stride(-1) == 1)             # ...the mask's too (GPU)
              and q.dtype == k.dtype == v.dtype)
    same_heads = q.size(1) == k.size(1) == v.size(1)
    gqa = enable_gqa and k.size(1) == v.size(1) and q.size(1) % k.size(1) == 0
    ok = set()
    if (common and attn_mask is None and q.dtype in (torch.float16, torch.bfloat16)
            and q.size(-1) == k.size(-1) == v.size(-1) <= 256 and (same_heads or gqa)
            and (not is_causal or q.size(-2) == k.size(-2))):                   # causal: square only here
        ok.add("flash")
    align = 8 if q.dtype in (torch.float16, torch.bfloat16) else 4             # minimum_gemm_alignment, sm80
    mask_ok = attn_mask is None or (
        attn_mask.dim() == 4 and attn_mask.dtype in (torch.bool, q.dtype)
        and attn_mask.size(0) in (1, q.size(0)) and attn_mask.size(1) in (1, q.size(1))
        and attn_mask.size(-2) in (1, q.size(-2)) and attn_mask.size(-1) in (1, k.size(-2)))
    if (common and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and same_heads and mask_ok
            and q.size(-1) == k.size(-1) and q.size(-1) % align == 0 and v.size(-1) % align == 0
            and all(t.storage_offset() * t.element_size() % (align * t.element_size()) == 0 for t in (q, k, v))):
        ok.add("efficient")
    return ok


def test_fused_backends_port_rejects_what_torch_rejects():
    # The port's verdicts on hand-made calls, one failing condition each (hd 64, bf16).
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 5, 64, generator=g).bfloat16(), torch.randn(2, 2, 5, 64, generator=g).bfloat16()
    kk = k.repeat_interleave(4, 1)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    assert fused_backends(q, k, k, is_causal=True, enable_gqa=True) == {"flash"}
    assert fused_backends(q, k, k, attn_mask=mask, enable_gqa=True) == set()   # the old call: math only
    assert fused_backends(q, kk, kk, attn_mask=mask) == {"efficient"}
    assert fused_backends(q, kk, kk, is_causal=True) == {"flash", "efficient"}
    assert fused_backends(q.float(), kk.float(), kk.float(), is_causal=True) == {"efficient"}
    assert fused_backends(q[..., :60], kk[..., :60], kk[..., :60]) == {"flash"}  # 60 % 8: not mem-efficient
    assert fused_backends(q, kk.transpose(-1, -2), kk) == set()                # key's last dim strided


def record_sdpa(monkeypatch):
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append(dict(q=q, k=k, v=v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          enable_gqa=enable_gqa))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_calls_are_ones_the_fused_kernels_take(tiny, monkeypatch, dtype):
    """Every SDPA call of a forward, a prefill (whole and chunked), decode steps and the scoring of
    completions after a cached prompt: FlashAttention where there is no mask (fp16/bf16),
    memory-efficient attention where there is one. GQA (llama*, qwen2) and a sliding window
    shorter than the prompt (mistral, window 8) included."""
    name, path, _ = tiny
    model = Transformer.from_pretrained(path, dtype=dtype)
    model.max_prefill_tokens = 24  # 2 rows x 12 positions per chunk: 3 chunks for 2 x 30 tokens
    calls = record_sdpa(monkeypatch)
    g = torch.Generator().manual_seed(5)

    class NoStop:
        pad_id, eos_ids = 0, [-1]

        def decode(self, ids):
            return ""
    with torch.no_grad():
        ids = torch.randint(3, 300, (2, 30), generator=g)
        model(ids)                                                           # training-shaped forward
        cache = KVCache(model.config, 2, 40, dtype, "cpu")
        model.prefill(ids, cache)                                            # chunked
        model.hidden(ids[:, :1], torch.tensor([[30], [17]]), cache)          # one decode step per row
        prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 7)]  # <= mistral's window
        generate(model, NoStop(), prompts, max_new_tokens=3)                 # engine prefill + decode
        score(model, prompts, [[7, 8, 9], [10, 11]])                         # prompt, then completions
    assert calls
    for c in calls:
        fused = fused_backends(**c)
        if dtype == torch.float32 and c["attn_mask"] is None and c["enable_gqa"]:
            continue  # fp32 causal GQA: flash is half precision only (model.attend says so); GPUs run bf16
        assert fused, (name, {k: (tuple(t.shape), t.dtype) if torch.is_tensor(t) else t for k, t in c.items()})
        if c["attn_mask"] is None and dtype != torch.float32:
            assert "flash" in fused, name
        if torch.cuda.is_available():  # what the port accepts, torch's own judges accept
            from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
            cuda = {k: t.cuda() if torch.is_tensor(t) else t for k, t in c.items()}
            p = SDPAParams(cuda["q"], cuda["k"], cuda["v"], cuda["attn_mask"], 0.0, c["is_causal"], c["enable_gqa"])
            assert "flash" not in fused or can_use_flash_attention(p, True), name
            assert "efficient" not in fused or can_use_efficient_attention(p, True), name
    masked = sum(c["attn_mask"] is not None for c in calls)
    assert 0 < masked < len(calls)  # both forms ran: the causal flag and a mask


def test_chunked_prefill_equals_one_forward(tiny, monkeypatch):
    name, path, _ = tiny
    model = Transformer.from_pretrained(path)
    ids = torch.randint(3, 300, (3, 29), generator=torch.Generator().manual_seed(6))
    whole, chunked = (KVCache(model.config, 3, 32, torch.float32, "cpu") for _ in range(2))
    with torch.no_grad():
        want = model.hidden(ids, None, whole)
        model.max_prefill_tokens = 3 * 8  # 8 positions per chunk: 8, 8, 8, 5
        calls = record_sdpa(monkeypatch)
        got = model.prefill(ids, chunked)
    assert max(c["q"].size(0) * c["q"].size(-2) for c in calls) <= model.max_prefill_tokens * \
        (model.config.num_attention_heads // model.config.num_key_value_heads)  # q rows fold the GQA group
    assert len(calls) == 4 * model.config.num_hidden_layers
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for kw, kc in zip(whole.k + whole.v, chunked.k + chunked.v):
        torch.testing.assert_close(kc[:, :, :29], kw[:, :, :29], atol=1e-5, rtol=1e-5)
    # under autograd, one forward: the chunks' in-place cache writes would break the backward
    calls.clear()
    model.prefill(ids, KVCache(model.config, 3, 32, torch.float32, "cpu"))
    assert len(calls) == model.config.num_hidden_layers
