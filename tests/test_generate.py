"""generate.py's engine: continuous batching, prefix sharing, per-row z, incremental stop strings,
and the shared-prompt policy gradient, each against the plain one-at-a-time computation."""
import pytest
import torch

import svd_cache
import svf
from generate import Engine, Row, StopStrings, Tokenizer, completion_hidden, generate
from model import ModelConfig, Transformer


class NoStop:  # random weights emit eos at random; these tests compare full-length outputs
    pad_id, eos_ids = 0, [-1]

    def decode(self, ids):
        return ""


def tiny_model(dtype=torch.float32, layers=3):
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      tie_word_embeddings=True, layer_windows=[None] * layers)
    torch.manual_seed(0)
    m = Transformer(cfg).to(dtype).eval().requires_grad_(False)
    for p in m.parameters():  # large weights: outputs depend on the input, not one repeated token
        p.data.normal_(0, 0.5)
    return m


def prompts(n=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (int(k),), generator=g).tolist() for k in torch.randint(3, 12, (n,), generator=g)]


def test_fewer_slots_than_prompts_equals_one_by_one_greedy():
    model, ps = tiny_model(), prompts()
    caps = [3, 9, 5, 12, 7]  # rows end at different times, so waiting rows take freed slots
    single = [generate(model, NoStop(), [p], max_new_tokens=c).ids[0] for p, c in zip(ps, caps)]
    for slots in (1, 2, 3, 64):
        g = generate(model, NoStop(), ps, max_new_tokens=caps, slots=slots)
        assert g.ids == single, slots
        assert [len(i) for i in g.ids] == caps and all(g.cut)


def test_progress_bar_only_when_asked(capsys):
    model, ps = tiny_model(), prompts()
    quiet = generate(model, NoStop(), ps, max_new_tokens=4, slots=2, samples=2)
    assert capsys.readouterr().err == ""
    shown = generate(model, NoStop(), ps, max_new_tokens=4, slots=2, samples=2, progress="answers")
    err = capsys.readouterr().err
    assert "answers:" in err and "/10" in err  # one tick per finished answer, 5 prompts x 2 samples
    assert shown.ids == quiet.ids


def test_seeded_sampling_does_not_depend_on_slots():
    model, ps = tiny_model(), prompts()
    runs = [generate(model, NoStop(), ps, max_new_tokens=8, temperature=1.0, seed=7, slots=s).ids for s in (1, 2, 5)]
    assert runs[0] == runs[1] == runs[2]
    other = generate(model, NoStop(), ps, max_new_tokens=8, temperature=1.0, seed=8, slots=2).ids
    assert other != runs[0]  # the seed matters: sampling really happens


def test_samples_share_one_prefill_and_equal_separate_runs():
    model, ps = tiny_model(), prompts(3)
    g = generate(model, NoStop(), ps, max_new_tokens=6, temperature=1.0, seed=[100, 200, 300], samples=4, slots=5)
    assert len(g.ids) == 12
    for r, ids in enumerate(g.ids):  # row r = prompt r // 4, sample r % 4, seeded seed[prompt] + sample
        i, j = divmod(r, 4)
        alone = generate(model, NoStop(), [ps[i]], max_new_tokens=6, temperature=1.0, seed=[100 * (i + 1) + j]).ids[0]
        assert ids == alone, r
    assert len({tuple(i) for i in g.ids[:4]}) > 1  # the 4 samples of one prompt differ
    greedy = generate(model, NoStop(), ps, max_new_tokens=6, samples=3, slots=4).ids
    assert greedy[0] == greedy[1] == greedy[2] == generate(model, NoStop(), [ps[0]], max_new_tokens=6).ids[0]


def test_per_row_z_follows_the_row_into_its_slot(tmp_path):
    model, ps = tiny_model(), prompts(4)
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    svf.attach(model, cache)
    g = torch.Generator().manual_seed(0)
    zs = {n: torch.rand(len(ps), cache.rank(n), generator=g) * 2 for n in cache.names}  # far from uniform
    batched = generate(model, NoStop(), ps, max_new_tokens=[4, 10, 6, 8], slots=2, zs=zs).ids
    assert all(m.z is None for _, m in svf.svf_modules(model))  # reset to the base weights afterwards
    for i, p in enumerate(ps):
        svf.set_z(model, {n: z[i] for n, z in zs.items()})
        assert batched[i] == generate(model, NoStop(), [p], max_new_tokens=[4, 10, 6, 8][i]).ids[0], i
    svf.set_z(model, None)
    base = generate(model, NoStop(), ps, max_new_tokens=10).ids
    assert base[1] != batched[1] or base[3] != batched[3]  # the z's change the answers


def test_engine_rows_join_mid_decode_each_with_its_own_z_and_sampling(tmp_path):
    """The step-wise engine as a server drives it: rows arrive while others decode, each with its own
    z (or the base weights), temperature and top_p; each answer equals that row generated alone."""
    model, ps = tiny_model(), prompts(6, seed=4)
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    svf.attach(model, cache)
    g = torch.Generator().manual_seed(1)
    experts = [{n: torch.rand(cache.rank(n), generator=g) * 2 for n in cache.names} for _ in range(2)]
    spec = [(experts[0], False, 0.0, 1.0), (None, True, 0.9, 1.0), (experts[1], False, 1.0, 0.7),
            (experts[1], False, 0.0, 1.0), (None, True, 0.0, 1.0), (experts[0], False, 1.3, 0.9)]
    rows = [Row(p, cap, key=i, z=z, base=base, temperature=t, top_p=tp, seed=10 + i)
            for i, (p, cap, (z, base, t, tp)) in enumerate(zip(ps, [7, 4, 9, 5, 8, 6], spec))]
    engine = Engine(model, NoStop(), 3, 32, per_row_z=True)
    finished = engine.admit(rows[:2])
    for _ in range(2):
        finished += engine.step()
    waiting = rows[2:]
    while waiting or len(engine.slots):  # join whenever a slot is free, else decode
        if waiting and engine.free():
            k = min(engine.free(), 1 + len(engine.slots) % 2, len(waiting))  # one or two at a time
            finished += engine.admit(waiting[:k])
            waiting = waiting[k:]
        else:
            finished += engine.step()
    engine.close()
    assert sorted(r.key for r in finished) == list(range(6)) and all(len(r.ids) == r.cap for r in rows)
    for r, (z, base, t, tp) in zip(rows, spec):  # alone: z set on the layers by hand, rescaled there
        svf.set_z(model, None if base else z)
        alone = generate(model, NoStop(), [r.prompt], max_new_tokens=r.cap, temperature=t, top_p=tp, seed=[r.seed])
        assert r.ids == alone.ids[0], r.key
    svf.set_z(model, None)
    assert len({tuple(r.ids) for r in rows}) == 6


def test_incremental_stop_check_stops_where_the_full_decode_does(smollm2_dir):
    tok = Tokenizer.from_pretrained(smollm2_dir)
    stop = ["\n\n", "```", "Answer:", "é!"]
    check = StopStrings(tok, stop)
    g = torch.Generator().manual_seed(0)
    pieces = tok.encode("Some text é! with ``` and Answer: then\n\nmore") + list(range(200, 260))
    hits = 0
    for trial in range(40):
        ids = [pieces[int(i)] for i in torch.randint(0, len(pieces), (30,), generator=g)]
        for k in range(1, len(ids) + 1):  # the naive check: decode everything, look for any stop string
            text = tok.decode(ids[:k])
            naive = text[:min(text.find(s) for s in stop if s in text)] if any(s in text for s in stop) else None
            assert check(ids[:k]) == naive, (trial, k)
            if naive is not None:
                hits += 1
                break
    assert hits > 10  # the stop strings were really met


def test_cut_flags_eos_and_caps(smollm2_dir):
    tok = Tokenizer.from_pretrained(smollm2_dir)
    model = Transformer.from_pretrained(smollm2_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2? Answer with one number."}])
    g = generate(model, tok, [prompt, prompt], max_new_tokens=[40, 2])
    assert g.cut == [False, True] and g.ids[0][-1] in tok.eos_ids and len(g.ids[1]) == 2


@pytest.mark.parametrize("layers", [None, "2"])
def test_shared_prompt_gradient_equals_unshared(tmp_path, layers):
    """k answers to one prompt through one prompt forward: same θ gradient as k full sequences (float64)."""
    model = tiny_model(torch.float64)
    cache = svd_cache.load(model, "mlp", layers=layers, root=tmp_path)
    svf.attach(model, cache)
    theta = {n: t.double().requires_grad_(True) for n, t in svf.init_theta(cache, seed=1).items()}
    ps = prompts(2, seed=5)
    prompt_ids = [ps[0]] * 3 + [ps[1]] * 2
    g = torch.Generator().manual_seed(9)
    comps = [torch.randint(1, 64, (int(k),), generator=g).tolist() for k in (4, 7, 2, 5, 6)]
    w = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.5], dtype=torch.float64)

    def grads(share):
        svf.set_z(model, {n: torch.sigmoid(t) for n, t in theta.items()})
        h, targets, row, _ = completion_hidden(model, prompt_ids, comps, share=share)
        logp = model.lm_head(h).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        return torch.autograd.grad(-(logp * w[row]).sum(), list(theta.values()))
    def reference():  # each (prompt, completion) as one plain sequence, no cache at all
        svf.set_z(model, {n: torch.sigmoid(t) for n, t in theta.items()})
        loss = 0
        for p, c, wi in zip(prompt_ids, comps, w):
            logp = model.lm_head(model.hidden(torch.tensor([p + c])))[0, len(p) - 1:-1].log_softmax(-1)  # (len(c), V)
            loss = loss - wi * logp.gather(-1, torch.tensor(c)[:, None]).sum()
        return torch.autograd.grad(loss, list(theta.values()))
    shared, alone, ref = grads(True), grads(False), reference()
    svf.set_z(model, None)
    for a, b, r in zip(shared, alone, ref):
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-12 * float(r.abs().max()))
        assert torch.allclose(b, r, rtol=1e-5, atol=1e-12 * float(r.abs().max()))
    assert sum(float(r.abs().sum()) for r in ref) > 0


def test_frozen_layers_below_the_adapted_ones_build_no_graph(tmp_path):
    """With SVF on layer 2 only, layers 0-1 run without autograd: no graph, no backward through them."""
    model = tiny_model()
    cache = svd_cache.load(model, "mlp", layers="2", root=tmp_path)
    svf.attach(model, cache)
    theta = {n: t.requires_grad_(True) for n, t in svf.init_theta(cache).items()}
    svf.set_z(model, {n: torch.sigmoid(t) for n, t in theta.items()})
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad)) for b in model.model.layers]
    h, *_ = completion_hidden(model, [[1, 2, 3]], [[4, 5]])
    for hk in hooks:
        hk.remove()
    svf.set_z(model, None)
    # two forwards (prompt, completion) x 3 layers: only layer 2's outputs carry a graph
    assert seen == [False, False, True, False, False, True] and h.requires_grad


def test_prefill_is_capped_and_decode_steps_never_read_positions_back(monkeypatch):
    """Issue 36 §2: the engine's prefills go through model.prefill (at most max_prefill_tokens per
    forward) and its decode steps tell the model how many cache slots to attend over, so no step
    waits on `int(pos.max())` (a host sync per step on a GPU). Outputs equal the uncapped run."""
    model, ps = tiny_model(), prompts(6)
    ref = generate(model, NoStop(), ps, max_new_tokens=7, slots=3).ids
    sizes, kv_lens = [], []
    hidden = model.hidden

    def spy(ids, pos=None, cache=None, embeds=None, kv_len=None):
        sizes.append(ids.numel())
        if pos is not None and cache is not None and ids.size(1) == 1:  # a decode step
            kv_lens.append(kv_len)
        return hidden(ids, pos, cache, embeds, kv_len)

    monkeypatch.setattr(model, "hidden", spy)
    model.max_prefill_tokens = 8
    got = generate(model, NoStop(), ps, max_new_tokens=7, slots=3).ids
    assert got == ref
    assert max(sizes) <= 8, sizes                   # no forward above the cap (prompts are up to 11 tokens)
    assert kv_lens and None not in kv_lens          # every decode step passed its cache length
