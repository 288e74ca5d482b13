"""Transformer² as a service: an OpenAI-compatible server where every request is answered by the
expert it needs, and all requests share one continuous batch (paper §3.3, docs/PAPER.md §4).

    python serve.py            # the shipped Qwen2.5-Coder-0.5B and its experts on http://127.0.0.1:8000
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "qwen2.5-coder-0.5b-instruct", "messages": [{"role": "user", "content": "What is 7*8?"}]}'

One request, two passes, as dispatch.py answers one prompt:
  pass 1  model "<name>" adapts: the question is labelled code / math / reasoning / other by the
          classification expert z^c (default), or with --strategy prompt by the base weights, with the
          adaptation prompt of evals/classify.py. Model "<name>:math" (code, reasoning, base) names the
          expert and skips pass 1, as vLLM and SGLang name LoRA adapters.
  pass 2  the answer, with the chosen expert's z; "other" and "base" run on the base weights exactly.
Both passes are rows of ONE generate.Engine batch: requests join and leave it while others decode,
and every row carries its own z (svf.set_z's per-row z), so nothing merges weights per request or
waits for a group of requests on the same expert (tools/bench_serve.py measures both ways).
One engine thread owns the model; the HTTP handlers (Starlette, run by uvicorn) only validate,
template, and exchange messages with it through queues. The answer names its expert (field "expert",
header x-expert) and `usage` counts both passes' tokens (the split is in usage.pass1 / usage.pass2).
Greedy unless the request sets a temperature: the same request gives the same answer, alone or not.
Why ~360 lines, past the ~300 aimed at: a third is the HTTP surface a client needs (request checks with
OpenAI-style errors, streaming, disconnects).
"""
import argparse
import asyncio
import itertools
import json
import os
import queue
import random
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Route

import cli
import svf
from dispatch import EXPERT_CATEGORIES
from evals.classify import cls_task
from evals.common import render_prompt
from generate import Engine, Row, StopStrings, Tokenizer
from model import Transformer

ROOT = Path(__file__).resolve().parent
EXPERTS = "experts/qwen2.5-coder-0.5b-instruct"   # {math,code,reasoning,cls}.safetensors; they name their base
ROLES = ("system", "user", "assistant")


class BadRequest(Exception):
    """The client's mistake: answered as OpenAI does, {"error": {...}} with a 4xx status."""

    def __init__(self, message, status=400, param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": "invalid_request_error",
                                                    "param": param, "code": code}}


class Job:
    """One chat request, between its HTTP handler (asyncio) and the engine thread. The engine thread
    speaks only through `send`: ("expert",), ("delta", text), ("done", text, finish_reason), ("error", msg)."""
    ids = itertools.count()

    def __init__(self, prompt, question, expert, max_tokens, sampling, stop, stream):
        self.id, self.created = f"chatcmpl-{next(Job.ids)}", int(time.time())
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.prompt, self.question, self.expert, self.category = prompt, question, expert, None
        self.max_tokens, self.sampling, self.stop, self.stream = max_tokens, sampling, stop, stream
        self.row, self.sent = None, ""      # the row now in the engine; the text streamed so far
        self.usage = {"pass1": [0, 0], "pass2": [0, 0]}  # [prompt, completion] tokens of each pass

    def send(self, *event):  # thread-safe: the event loop puts it on the queue
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


# -----------------------------------------------------------------------------
# The engine thread: the only code that touches the model

class Worker:
    def __init__(self, model, tok, experts, strategy, slots, context):
        self.model, self.tok, self.strategy, self.slots, self.context = model, tok, strategy, slots, context
        dev = next(model.parameters()).device
        self.z = {name: {n: z.to(dev) for n, z in e.zs().items()} for name, e in experts.items()}  # on the device once
        self.rescale = next(iter(experts.values())).rescale  # one rule for all (svf.load_experts checked)
        self.engine = Engine(model, tok, slots, context, per_row_z=True, rescale=self.rescale)
        self.inbox, self.waiting, self.keys = queue.Queue(), deque(), itertools.count()
        self.batch = deque(maxlen=100_000)  # rows in each decode step (tests: a cancelled stream frees its slot)
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)

    def row(self, job, pass1):
        """Pass 1: the adaptation prompt, z^c or the base weights. Pass 2: the answer, the chosen z."""
        name = ("cls" if self.strategy == "cls" else "base") if pass1 else job.expert
        prompt, cap = (job.question, cls_task.max_new_tokens) if pass1 else (job.prompt, job.max_tokens)
        stop = StopStrings(self.tok, cls_task.stop if pass1 else job.stop)
        job.row = Row(prompt, cap, key=next(self.keys), z=self.z.get(name), base=name not in self.z,
                      stop=stop, tag=job, **({} if pass1 else job.sampling))
        return job.row

    def run(self):
        with torch.inference_mode():
            while True:
                idle = not self.waiting and not len(self.engine.slots)
                msgs = [self.inbox.get(block=idle)] if idle or not self.inbox.empty() else []
                while not self.inbox.empty():
                    msgs.append(self.inbox.get())
                for kind, job in msgs:
                    if kind == "stop":
                        return self.fail_all("the server is shutting down")
                    if kind == "new":
                        self.waiting.append(self.row(job, pass1=job.expert is None))
                        if job.expert is not None:
                            job.send("expert")
                    elif kind == "cancel" and job.row in self.waiting:
                        self.waiting.remove(job.row)
                    elif kind == "cancel":  # its slot is free for the next step
                        self.engine.cancel(job.row)
                try:
                    self.tick()
                except Exception as e:  # a bug must not hang every client: fail the jobs in flight, go on
                    self.fail_all(f"engine error: {type(e).__name__}: {e}")
                    self.engine = Engine(self.model, self.tok, self.slots, self.context, True, self.rescale)

    def tick(self):
        """Admit waiting rows while slots are free, else one decode step; then hand out text."""
        if self.waiting and self.engine.free():
            done = self.engine.admit([self.waiting.popleft() for _ in range(min(self.engine.free(), len(self.waiting)))])
        elif len(self.engine.slots):
            self.batch.append(len(self.engine.slots))
            done = self.engine.step()
        else:
            return
        for row in self.engine.slots.rows:  # streamed pass-2 rows: the text that can no longer change
            job = row.tag
            if job.stream and job.expert is not None:
                text = self.tok.decode(row.ids)
                text = text[:len(text) - max((len(s) - 1 for s in job.stop), default=0)]  # may start a stop string
                if len(text) > len(job.sent) and not text.endswith("\ufffd"):  # not half a UTF-8 character
                    job.send("delta", text[len(job.sent):])
                    job.sent = text
        for row in done:
            self.finish(row)

    def finish(self, row):
        job = row.tag
        if job.expert is None:  # pass 1 done: its label picks pass 2's expert, which goes first in line
            job.usage["pass1"] = [len(row.prompt), len(row.ids)]
            job.category = cls_task.extract(row.text)
            job.expert = job.category if job.category in EXPERT_CATEGORIES else "base"
            job.send("expert")
            self.waiting.appendleft(self.row(job, pass1=False))
        else:
            job.usage["pass2"] = [len(row.prompt), len(row.ids)]
            job.send("done", row.text, "length" if row.cut else "stop")

    def fail_all(self, message):
        for row in list(self.engine.slots.rows) + list(self.waiting):
            row.tag.send("error", message)
        self.waiting.clear()


# -----------------------------------------------------------------------------
# The HTTP side: validate, template, wait for events

def number(body, key, default, lo, hi, kind=(int, float)):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, kind) or not lo <= v <= hi:
        raise BadRequest(f"{key} must be a number in [{lo}, {hi}], got {json.dumps(v)}", param=key)
    return v


def app_for(worker, name, max_tokens):
    tok, context = worker.tok, worker.context

    def parse(body):
        """A request body -> a Job, or BadRequest naming what is wrong."""
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        model = body.get("model")
        base, _, expert = str(model).partition(":")
        if base != name or expert not in ("", *EXPERT_CATEGORIES, "base"):
            raise BadRequest(f"model {json.dumps(model)} does not exist: use {name} (adapts per request) or "
                             f"{name}:EXPERT, EXPERT in {', '.join([*EXPERT_CATEGORIES, 'base'])}", 404, "model",
                             "model_not_found")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("messages must be a non-empty list", param="messages")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise BadRequest(f"each message needs a role in {ROLES} and a string content, got {json.dumps(m)}",
                                 param="messages")
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if not users:
            raise BadRequest("messages hold no user turn", param="messages")
        if body.get("n", 1) != 1:
            raise BadRequest("only n=1 is served", param="n")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("stop must be a string or a list of strings", param="stop")
        sampling = {"temperature": number(body, "temperature", 0.0, 0, 2), "top_p": number(body, "top_p", 1.0, 0, 1),
                    "seed": number(body, "seed", None, 0, 2 ** 62, int)}
        if sampling["seed"] is None:  # unseeded sampling differs from call to call, as clients expect
            sampling["seed"] = random.randrange(2 ** 62)
        try:
            prompt = tok.encode(tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in msgs]))
        except Exception as e:  # the chat template refuses (e.g. roles that do not alternate)
            raise BadRequest(f"the chat template refuses these messages: {e}", param="messages") from None
        # pass 1 asks about the last user turn, exactly the prompt dispatch.py builds for one question
        question = tok.encode(render_prompt(tok, cls_task, {"question": users[-1]})) if not expert else None
        limit = number(body, "max_completion_tokens", None, 1, 2 ** 31, int)
        limit = number(body, "max_tokens", limit, 1, 2 ** 31, int)
        room = context - len(prompt)  # what the KV cache row has left for the answer
        if room < 1 or (limit or 0) > room:
            raise BadRequest(f"this server's context is {context} tokens; the prompt takes {len(prompt)}, leaving "
                             f"{max(room, 0)} for max_tokens, and {limit} were asked", param="max_tokens",
                             code="context_length_exceeded")
        if question is not None and len(question) + cls_task.max_new_tokens > context:
            raise BadRequest(f"this server's context is {context} tokens; pass 1's prompt for this question takes "
                             f"{len(question)} + {cls_task.max_new_tokens}", param="messages", code="context_length_exceeded")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be true or false", param="stream")
        return Job(prompt, question, expert or None, min(limit or max_tokens, room), sampling, stop, stream)

    def payload(job, obj, **fields):
        return {"id": job.id, "object": obj, "created": job.created, "model": f"{name}:{job.expert}",
                "expert": job.expert, "category": job.category, **fields}

    def usage(job):
        (p1, c1), (p2, c2) = job.usage["pass1"], job.usage["pass2"]
        return {"prompt_tokens": p1 + p2, "completion_tokens": c1 + c2, "total_tokens": p1 + c1 + p2 + c2,
                "pass1": {"prompt_tokens": p1, "completion_tokens": c1},
                "pass2": {"prompt_tokens": p2, "completion_tokens": c2}}

    async def next_event(job):
        event = await job.events.get()
        if event[0] == "error":
            raise BadRequest(event[1], 503, code="engine_error")
        return event

    async def chat(request):
        try:
            body = await request.json()
        except ValueError as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None
        job = parse(body)
        worker.inbox.put(("new", job))
        try:  # pass 1 first, so the header can name the expert even when streaming
            await next_event(job)
        except asyncio.CancelledError:
            worker.inbox.put(("cancel", job))
            raise
        headers = {"x-expert": job.expert}
        if not job.stream:
            while (event := await next_event(job))[0] != "done":
                pass
            choice = {"index": 0, "message": {"role": "assistant", "content": event[1]}, "finish_reason": event[2]}
            return JSONResponse(payload(job, "chat.completion", choices=[choice], usage=usage(job)), headers=headers)

        def chunk(delta, finish=None):
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return json.dumps(payload(job, "chat.completion.chunk", choices=[choice]))

        async def events():  # cancelled by sse-starlette when the client goes away: the finally frees the slot
            done = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (event := await next_event(job))[0] != "done":
                    yield chunk({"content": event[1]})
                done = True
                yield chunk({"content": event[1][len(job.sent):]}, event[2])
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield json.dumps(payload(job, "chat.completion.chunk", choices=[], usage=usage(job)))
                yield "[DONE]"
            finally:
                if not done:
                    worker.inbox.put(("cancel", job))
        return EventSourceResponse(events(), headers=headers)

    async def models(request):
        ids = [name] + [f"{name}:{e}" for e in (*EXPERT_CATEGORIES, "base")]
        return JSONResponse({"object": "list", "data": [{"id": i, "object": "model", "owned_by": "transformer2"}
                                                        for i in ids]})

    async def health(request):
        return JSONResponse({"status": "ok", "busy": len(worker.engine.slots), "slots": worker.slots,
                             "waiting": len(worker.waiting)})

    def error(request, exc):
        if isinstance(exc, BadRequest):
            return JSONResponse(exc.body, exc.status)
        return JSONResponse(BadRequest(exc.detail, exc.status_code).body, exc.status_code)  # 404, 405 of routing

    @asynccontextmanager
    async def lifespan(app):
        worker.thread.start()
        yield
        worker.inbox.put(("stop", None))
        worker.thread.join()

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models),
              Route("/health", health)]
    app = Starlette(routes=routes, exception_handlers={BadRequest: error, HTTPException: error}, lifespan=lifespan)
    app.state.name = name
    return app


# -----------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to serve")
    g.add_argument("--experts", default=EXPERTS, help="folder with math, code, reasoning (and cls) .safetensors")
    g.add_argument("--model", default=None, help="the base model (default: the one the experts name in their metadata)")
    g.add_argument("--name", default=None, help="the model name clients ask for (default: the model folder's name)")
    g.add_argument("--strategy", default="cls", choices=["cls", "prompt"],
                   help="pass 1: the classification expert z^c (cls.safetensors) or the base model's prompt")
    g = p.add_argument_group("engine")
    g.add_argument("--slots", type=cli.positive_int, default=16, help="rows decoded together (one KV cache)")
    g.add_argument("--context", type=cli.positive_int, default=2048, help="tokens per row: prompt + answer")
    g.add_argument("--max-tokens", type=cli.positive_int, default=512, help="answer length when a request sets none")
    g.add_argument("--threads", type=cli.positive_int, default=min(2, os.cpu_count() or 1))
    cli.add_device_args(p)
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=cli.positive_int, default=8000)
    return p.parse_args(argv)


def build(args):
    """(Starlette app, Worker): load the experts and the model, attach the factored layers."""
    torch.set_num_threads(args.threads)
    cats = [*EXPERT_CATEGORIES, "cls"] if args.strategy == "cls" else list(EXPERT_CATEGORIES)
    folder = Path(args.experts) if Path(args.experts).exists() else ROOT / args.experts  # run from anywhere
    experts = {c: svf.Expert.load(folder / f"{c}.safetensors") for c in cats}  # read before the model
    model_dir = args.model or experts["math"].meta.get("base_model")
    if not model_dir:
        raise ValueError(f"{folder}/math.safetensors names no base_model: pass --model")
    if args.model is None and not Path(model_dir).exists() and (ROOT / model_dir).exists():
        model_dir = str(ROOT / model_dir)  # the metadata names it relative to the repository
    device, dtype = cli.device_and_dtype(args)
    model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device)
    tok = Tokenizer.from_pretrained(model_dir)
    loaded, cache = svf.load_experts(model, list(experts.values()))  # checks fit and one rescale rule; attaches
    context = min(args.context, model.config.max_position_embeddings)
    worker = Worker(model, tok, dict(zip(experts, loaded)), args.strategy, args.slots, context)
    worker.experts, worker.cache = dict(zip(experts, loaded)), cache  # tools/bench_serve.py merges them
    return app_for(worker, args.name or Path(model_dir).name, args.max_tokens), worker


def main(args):
    import uvicorn
    app, _ = build(args)
    print(f"serving {app.state.name} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    cli.run(main, get_args())
