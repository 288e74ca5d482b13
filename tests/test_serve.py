"""serve.py through the real `openai` client: answers equal dispatch.py's (alone and among many concurrent
requests on different experts), streaming adds up to the same text, 64 clients get their own answers,
bad input gets OpenAI-style errors while the server keeps serving, a client that leaves mid-stream frees
its slot, Ctrl-C stops the server cleanly; and one run of the shipped Qwen experts."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
import uvicorn

import dispatch
import serve
import svd_cache
import svf
from generate import Tokenizer, generate
from model import Transformer

ROOT = Path(__file__).resolve().parents[1]
CATS = ("math", "code", "reasoning", "cls")
QUESTIONS = [f"Question {i}: what is {i} + {2 * i}? " + "Explain briefly." * (i % 3) for i in range(64)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """serve.py's app on a free port, in this process (uvicorn in a thread): tests can look at the worker."""

    def __init__(self, argv):
        self.port = free_port()
        self.app, self.worker = serve.build(serve.get_args([*argv, "--threads", "1"]))
        self.server = uvicorn.Server(uvicorn.Config(self.app, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    """conftest's tiny model (SmolLM2's tokenizer) with four random experts, math/code/reasoning/cls."""
    tmp = tmp_path_factory.mktemp("serve")
    old, os.environ["T2_CACHE"] = os.environ.get("T2_CACHE"), str(tmp / "cache")
    model = Transformer.from_pretrained(tiny_dir)
    cache = svd_cache.load(model, "mlp")
    g = torch.Generator().manual_seed(0)
    for c in CATS:  # θ ~ N(0, 1): far from uniform z, so every expert changes the answers
        svf.Expert.new({n: torch.randn(cache.rank(n), generator=g) for n in cache.names}, model, cache,
                       task=c).save(tmp / f"{c}.safetensors")
    yield tiny_dir, tmp
    if old is None:
        os.environ.pop("T2_CACHE")
    else:
        os.environ["T2_CACHE"] = old


@pytest.fixture(scope="module")
def server(tiny):
    folder, tmp = tiny
    s = Served(["--model", str(folder), "--experts", str(tmp), "--name", "tiny", "--slots", "16",
                "--context", "2048", "--max-tokens", "6"])
    yield s
    s.stop()


def dispatch_answer(folder, tmp, question, max_tokens):
    """`python dispatch.py QUESTION --strategy cls ...` on the same files: (category, answer)."""
    experts = [f"{c}={tmp}/{c}.safetensors" for c in CATS[:3]]
    out = dispatch.main(dispatch.get_args([question, "--model", str(folder), "--experts", *experts, "--strategy", "cls",
                                           "--cls-expert", f"{tmp}/cls.safetensors", "--max-new-tokens",
                                           str(max_tokens), "--threads", "1"]))
    return out["category"], out["answer"]


def merged_answers(folder, tmp, requests, max_tokens):
    """Each (question, expert) answered the official way, dispatch.adapted: the expert merged into W."""
    model, tok = Transformer.from_pretrained(folder), Tokenizer.from_pretrained(folder)
    loaded, cache = svf.load_experts(model, [f"{tmp}/{c}.safetensors" for c in CATS[:3]], factored=False)
    experts, out = dict(zip(CATS, loaded)), {}
    for expert in sorted({e for _, e in requests}):
        qs = [q for q, e in requests if e == expert]
        with dispatch.adapted(model, expert, experts, cache):
            texts = generate(model, tok, [tok.apply_chat_template([{"role": "user", "content": q}]) for q in qs],
                             max_new_tokens=max_tokens).texts
        out.update({(q, expert): t for q, t in zip(qs, texts)})
    return out


def ask(client, question, model="tiny", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          temperature=0, **kw)


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list()] == ["tiny", "tiny:math", "tiny:code", "tiny:reasoning", "tiny:base"]
    health = json.loads(urllib.request.urlopen(server.url + "/health").read())
    assert health["status"] == "ok" and health["slots"] == 16


def test_answers_equal_dispatch_alone_among_32_and_streamed(server, tiny):
    folder, tmp = tiny
    category, want = dispatch_answer(folder, tmp, QUESTIONS[0], 6)
    alone = ask(server.client, QUESTIONS[0])
    assert alone.choices[0].message.content == want and alone.category == category
    assert alone.expert == (category if category in CATS[:3] else "base")
    assert alone.model == f"tiny:{alone.expert}"
    # usage: pass 1 (the adaptation prompt and its label) plus pass 2 (the chat prompt and the answer)
    u = alone.usage
    assert u.pass1["completion_tokens"] >= 1 and u.pass2["completion_tokens"] <= 6
    assert u.prompt_tokens == u.pass1["prompt_tokens"] + u.pass2["prompt_tokens"] > u.pass1["prompt_tokens"] > 100
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    raw = server.client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0)
    assert raw.headers["x-expert"] == alone.expert
    # 32 at once, routed to every expert (named ones skip pass 1) and to pass 1's choice
    reqs = [(QUESTIONS[i], ("", "math", "code", "reasoning", "base")[i % 5]) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda r: ask(server.client, r[0], "tiny" + (":" + r[1] if r[1] else "")), reqs))
    ref = merged_answers(folder, tmp, [(q, e or g.expert) for (q, e), g in zip(reqs, got)], 6)
    assert [g.choices[0].message.content for g in got] == [ref[q, e or g.expert] for (q, e), g in zip(reqs, got)]
    assert got[0].choices[0].message.content == want and {g.expert for g in got} >= {"math", "code", "reasoning", "base"}
    assert len({g.choices[0].message.content for g in got}) > 16  # the answers differ: a mix-up would show
    assert max(server.worker.batch) > 8  # they really shared decode steps
    # streamed: the chunks add up to the same text; the expert is named in the header and every chunk
    for model in ("tiny", "tiny:code"):
        with server.client.chat.completions.with_streaming_response.create(
                model=model, messages=[{"role": "user", "content": QUESTIONS[5]}], temperature=0, stream=True,
                max_tokens=20, stream_options={"include_usage": True}) as resp:
            chunks = list(resp.parse())
            expert = resp.headers["x-expert"]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        whole = ask(server.client, QUESTIONS[5], model, max_tokens=20)
        assert text == whole.choices[0].message.content and expert == whole.expert
        assert len([c for c in chunks if c.choices]) > 3 and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_64_concurrent_clients_each_get_their_own_answer(server, tiny):
    reqs = [(q, ("math", "code", "reasoning", "base")[i % 4]) for i, q in enumerate(QUESTIONS)]
    ref = merged_answers(*tiny, reqs, 5)
    with ThreadPoolExecutor(64) as pool:
        got = list(pool.map(lambda r: ask(server.client, r[0], f"tiny:{r[1]}", max_tokens=5), reqs))
    assert [(g.expert, g.choices[0].message.content) for g in got] == [(e, ref[q, e]) for q, e in reqs]


def post(url, data, content_type="application/json"):
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"model": "tiny"}, 400, "messages", "non-empty list"),
    ({"model": "tiny", "messages": []}, 400, "messages", "non-empty list"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", "role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, 400, "messages", "string content"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "does not exist"),
    ({"model": "tiny:poetry", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "tiny:EXPERT"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi " * 3000}]}, 400, "max_tokens", "context is 2048"),
    ({"model": "tiny:math", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens", "number"),
    ({"model": "tiny:math", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens", "number"),
    ({"model": "tiny:math", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 9}, 400, "max_tokens",
     "context is 2048"),
    ({"model": "tiny:math", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature",
     "number"),
    ({"model": "tiny:math", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature", "[0, 2]"),
])
def test_bad_input_is_an_openai_error_and_the_server_goes_on(server, body, status, param, words):
    code, reply = post(server.url, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert code == status and reply["error"]["param"] == param and words in reply["error"]["message"], reply
    assert reply["error"]["type"] == "invalid_request_error"
    assert ask(server.client, "hi", "tiny:math", max_tokens=2).choices[0].finish_reason == "length"  # still serving


def test_the_client_raises_openais_own_errors(server):
    with pytest.raises(openai.NotFoundError):
        ask(server.client, "hi", "tiny:nope")
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(server.client, "hi", "tiny:math", max_tokens=10 ** 6)


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    worker = server.worker
    before = worker.engine.tokens["decode"]
    streams = [server.client.chat.completions.create(model="tiny:math", messages=[{"role": "user", "content": q}],
                                                     temperature=0, stream=True, max_tokens=1500)
               for q in QUESTIONS[:16]]
    for s in streams:  # each has begun (its first token came), then its client goes away
        next(iter(s))
        next(iter(s))
        s.close()
    deadline = time.time() + 20
    while len(worker.engine.slots) or worker.waiting:
        assert time.time() < deadline, "the left streams still hold their slots"
        time.sleep(0.05)
    assert worker.engine.tokens["decode"] - before < 16 * 1500 / 2  # they stopped long before their cap
    assert worker.engine.free() == 16  # every slot is free again
    steps = len(worker.batch)
    # the next 16 decode together: long enough answers (a few hundred tiny-model steps) that the last
    # request arrives while the first still decode, however slowly a busy machine starts the clients
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda q: ask(server.client, q, "tiny:code", max_tokens=400), QUESTIONS[16:32]))
    assert all(g.choices[0].finish_reason for g in got) and max(list(worker.batch)[steps:]) == 16


def test_ctrl_c_stops_the_server_cleanly(tiny):
    folder, tmp = tiny
    port = free_port()
    p = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(folder), "--experts", str(tmp),
                          "--port", str(port), "--threads", "1", "--slots", "2", "--context", "256"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "slow"
                time.sleep(0.2)
        name = folder.name
        assert post(f"http://127.0.0.1:{port}", json.dumps({"model": f"{name}:base", "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}]}).encode())[0] == 200
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert f"serving {name} on http://127.0.0.1:{port}/v1" in out


def test_shipped_qwen_experts_answer_as_dispatch_does():
    """`python serve.py` with no flags serves these: the shipped experts and the base model they name.
    The slowest test here (the reference merges z^c, then the expert, into 0.5B weights on the CPU)."""
    experts = ROOT / serve.EXPERTS
    base = svf.Expert.load(experts / "math.safetensors").meta["base_model"]
    if not (ROOT / base / "model.safetensors").exists():
        pytest.fail(f"{base} is missing: run `make model MODEL=qwen2.5-coder-0.5b` first (make test does it for you)")
    question, code = "What is 12 * 7? Give the number.", "Write a Python function that reverses a string."
    want = dispatch_answer(ROOT / base, experts, question, 4)
    s = Served(["--slots", "4", "--context", "1024"])
    try:  # pass 1 adapts the first; the second names its expert and decodes beside it
        with ThreadPoolExecutor(2) as pool:
            got, named = pool.map(lambda r: ask(s.client, r[0], r[1], max_tokens=4),
                                  [(question, Path(base).name), (code, Path(base).name + ":code")])
    finally:
        s.stop()
    assert (got.category, got.choices[0].message.content) == want and got.expert == "math"
    assert named.expert == "code" and named.usage.completion_tokens == 4 and named.usage.pass1["prompt_tokens"] == 0
