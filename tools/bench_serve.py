"""Throughput of serve.py: one continuous batch, every row its own expert, against the two other ways.

Three ways to answer the same requests, each naming an expert (math, code, reasoning, base in turn;
greedy, the same max_tokens), measured in one run on one loaded model:
  served, C clients   serve.py over HTTP (the real openai client), C clients each sending its share of
                      the requests one after another: rows of different experts share decode steps.
  one at a time       dispatch.py's single-prompt way: the request's expert merged into W, the request
                      answered alone; requests taken in expert order, so only 4 merges (its best case:
                      a merge per request costs seconds here, since svf.merged re-checks the SVD cache).
  grouped, merged     dispatch.py's pass2_merged way: per expert, merge once and answer its whole group in
                      one batch (the official code's way, which must wait until a group has gathered).
Tokens are completion tokens; every way gives the same greedy answers up to the rounding of W′ against
its factors (the "same" column counts answers equal to one-at-a-time's).

    python tools/bench_serve.py --model checkpoints/smollm2-135m-instruct --random-experts --max-tokens 16
    python tools/bench_serve.py            # the shipped Qwen experts (slower on a CPU)
On a shared CPU only the ratios inside one run are claims (docs/RESULTS.md).
"""
import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import dispatch  # noqa: E402
import serve  # noqa: E402
import svd_cache  # noqa: E402
import svf  # noqa: E402
from generate import generate  # noqa: E402
from model import Transformer  # noqa: E402

EXPERTS = ("math", "code", "reasoning", "base")
TOPICS = ["the sum of {} and {}", "a Python function that returns {} times {}", "why {} apples weigh more than {}",
          "a short poem about the numbers {} and {}"]


def random_experts(model_dir, folder):
    """θ ~ N(0, 1) experts for a model without trained ones (throughput does not depend on the values)."""
    model = Transformer.from_pretrained(model_dir)
    cache = svd_cache.load(model, "mlp")
    g = torch.Generator().manual_seed(0)
    for c in ("math", "code", "reasoning", "cls"):
        svf.Expert.new({n: torch.randn(cache.rank(n), generator=g) for n in cache.names}, model, cache,
                       task=c).save(Path(folder) / f"{c}.safetensors")


def served(client, name, requests, clients, max_tokens):
    """C clients, each sending its requests one after another; returns (answers, completion tokens)."""
    out = [None] * len(requests)

    def one_client(k):
        for i in range(k, len(requests), clients):
            q, e = requests[i]
            r = client.chat.completions.create(model=f"{name}:{e}", messages=[{"role": "user", "content": q}],
                                               temperature=0, max_tokens=max_tokens)
            out[i] = (r.choices[0].message.content, r.usage.completion_tokens)
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    return [t for t, _ in out], sum(n for _, n in out)


def merged(worker, requests, max_tokens, grouped):
    """dispatch.py's ways on the server's model (idle now): merge W′ per request, or per expert group."""
    model, tok = worker.model, worker.tok
    experts = {c: worker.experts[c] for c in EXPERTS if c in worker.experts}
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q, _ in requests]
    texts, tokens = [None] * len(requests), 0
    svf.detach(model)  # plain nn.Linear layers: merging writes W′ into their weights
    try:
        for c in EXPERTS:  # one merge per expert, in both ways (one per request would cost far more)
            group = [i for i, (_, e) in enumerate(requests) if e == c]
            with dispatch.adapted(model, c, experts, worker.cache):
                for part in [group] if grouped else [[i] for i in group]:
                    g = generate(model, tok, [prompts[i] for i in part], max_new_tokens=max_tokens, slots=len(part))
                    for i, t, ids in zip(part, g.texts, g.ids):
                        texts[i], tokens = t, tokens + len(ids)
    finally:
        svf.attach(model, worker.cache)
    return texts, tokens


def main(args):
    tmp = tempfile.TemporaryDirectory()
    if args.random_experts:
        random_experts(args.model, tmp.name)
    argv = ["--experts", tmp.name if args.random_experts else args.experts, "--slots", str(args.slots),
            "--context", "1024", "--threads", str(args.threads), *(["--model", args.model] if args.model else [])]
    app, worker = serve.build(serve.get_args(argv))
    import openai
    import uvicorn
    port = 8765
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    name = app.state.name
    requests = [(f"Write {TOPICS[i % 4].format(i, 3 * i + 1)}.", EXPERTS[i % 4]) for i in range(args.requests)]
    rows, base = [], None

    def report(way, clients, fn):
        t0 = time.perf_counter()
        texts, tokens = fn()
        dt = time.perf_counter() - t0
        same = "-" if base is None else sum(a == b for a, b in zip(texts, base))
        rows.append((way, clients, tokens, dt, tokens / dt, same))
        print(f"{way:>16} | {clients:>7} | {tokens:>6} tokens | {dt:7.1f} s | {tokens / dt:7.1f} tok/s | same {same}",
              flush=True)
        return texts
    served(client, name, requests[:4], 4, 2)  # warm-up: first calls pay one-time costs
    base = report("one at a time", 1, lambda: merged(worker, requests, args.max_tokens, grouped=False))
    report("grouped, merged", 4, lambda: merged(worker, requests, args.max_tokens, grouped=True))
    for c in args.clients:
        report("served", c, lambda: served(client, name, requests, c, args.max_tokens))
    server.should_exit = True
    one = rows[0][4]
    table = ["| way | clients | completion tokens | seconds | tok/s | vs one at a time | same answers |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {w} | {c} | {n} | {dt:.1f} | {tps:.1f} | {tps / one:.2f}x | {s} |" for w, c, n, dt, tps, s in rows]
    text = (f"{args.requests} requests (math, code, reasoning, base in turn), max_tokens {args.max_tokens}, greedy, "
            f"slots {args.slots}, {args.threads} thread(s); model {worker.model.name_or_path}\n\n" + "\n".join(table) + "\n")
    print(text)
    if args.out:
        with cli.atomic_write(args.out) as t:
            Path(t).write_text(text)
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model (default: the experts' own)")
    p.add_argument("--experts", default=serve.EXPERTS, help="folder with math, code, reasoning, cls .safetensors")
    p.add_argument("--random-experts", action="store_true", help="make θ ~ N(0, 1) experts for --model")
    p.add_argument("--requests", type=cli.positive_int, default=64)
    p.add_argument("--clients", type=cli.positive_int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--max-tokens", type=cli.positive_int, default=16)
    p.add_argument("--slots", type=cli.positive_int, default=64)
    p.add_argument("--threads", type=cli.positive_int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default=None, help="write the table (markdown) here")
    cli.run(main, p.parse_args())
