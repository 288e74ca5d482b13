"""The user's path with their own model (issue 36 §1), tested on the CPU: `make train MODEL=<folder or
hub id>`, chat templates wherever a checkpoint keeps them, which files a hub download fetches and what
a failed one says, and LLaVA configs that leave fields to transformers' defaults.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_gpu_path.py
"""
import json
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------
# Makefile: any folder or hub id as MODEL

def make_n(*args):
    """`make -n` (print, run nothing) with setup taken as done: the commands make would run."""
    r = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.done", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.replace("\\\n", " ")  # join continued lines


def script_args(out, script):
    """The argument list of the line of `out` that runs `script` (exactly one)."""
    lines = [shlex.split(line) for line in out.splitlines() if f" {script} " in f" {line} "]
    assert len(lines) == 1, out
    words = lines[0]
    return words[words.index(script) + 1:]


def flag(words, name):
    return words[words.index(name) + 1]


@pytest.mark.parametrize("model", ["/data/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct"])
def test_make_train_takes_a_folder_or_hub_id(model):
    out = make_n("train", "TASK=gsm8k", f"MODEL={model}")
    words = script_args(out, "reinforce.py")
    assert flag(words, "--model") == model and flag(words, "--task") == "gsm8k"
    assert flag(words, "--out") == "runs/gsm8k-Meta-Llama-3-8B-Instruct"
    assert "gguf_to_hf.py" not in out  # the conversion is for the shipped names only


def test_make_train_shipped_name_still_converts():
    out = make_n("train", "TASK=gsm8k")
    assert flag(script_args(out, "tools/gguf_to_hf.py"), "--model") == "qwen2.5-coder-0.5b"
    assert flag(script_args(out, "reinforce.py"), "--model") == "checkpoints/qwen2.5-coder-0.5b-instruct"


@pytest.mark.parametrize("target,script", [("cem", "cem.py"), ("dispatch", "dispatch.py"), ("ablation", "reinforce.py")])
def test_make_cem_dispatch_ablation_take_a_folder(tmp_path, target, script):
    model = tmp_path / "llama3"
    edir = tmp_path / "mine"  # experts the user trained, named by EXPERT_DIR
    edir.mkdir()
    for c in ("math", "code", "reasoning", "cls"):
        (edir / f"{c}.safetensors").touch()
    out = make_n(target, f"MODEL={model}", f"EXPERT_DIR={edir}")
    words = script_args(out, script)
    assert flag(words, "--model") == str(model) and "gguf_to_hf.py" not in out
    if target == "ablation":  # its own runs folder, so the base row of another model is not reused
        assert flag(words, "--out") == "runs/table4-llama3/lora-sft-qv"


def test_make_unseen_takes_a_folder(tmp_path):
    edir = tmp_path / "mine"
    edir.mkdir()
    for c in ("math", "code", "reasoning", "cls"):
        (edir / f"{c}.safetensors").touch()
    out = make_n("unseen", "TASK=humaneval", "MODEL=/data/llama3/", f"EXPERT_DIR={edir}")
    cem = script_args(out, "cem.py")
    assert flag(cem, "--model") == "/data/llama3/" and flag(cem, "--out") == "runs/unseen-humaneval-llama3/cem"


def test_make_model_refuses_a_name_that_is_nothing():
    r = subprocess.run(["make", "-s", "--no-print-directory", "-o", ".venv/.done", "model", "MODEL=smollm2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "MODEL=smollm2: not a shipped model" in r.stdout


# -----------------------------------------------------------------------------
# Chat templates: every place a checkpoint can keep one, rendered as transformers renders it

# Meta-Llama-3-8B-Instruct's template (tokenizer_config.json of the hub repo)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
STALE = "{{ 'a stale template that must not be used' }}"
CHATS = [[{"role": "user", "content": "What is 12*7?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " 2+2? "},
          {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]]


def save_tokenizer(hf, d, template, way):
    """Save transformers tokenizer `hf` into d with `template` stored the given way."""
    if way == "config_str":          # the older layout: tokenizer_config.json "chat_template": "..."
        hf.chat_template = template
        hf.save_pretrained(d, save_jinja_files=False)
    elif way == "config_list":       # named templates in tokenizer_config.json: [{"name", "template"}]
        hf.chat_template = {"default": template, "tool_use": STALE}
        hf.save_pretrained(d, save_jinja_files=False)
    elif way == "jinja":             # transformers' current default: chat_template.jinja, beating a stale key
        hf.chat_template = template
        hf.save_pretrained(d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": STALE}))
    elif way == "jinja_named":       # chat_template.jinja + additional_chat_templates/tool_use.jinja
        hf.chat_template = {"default": template, "tool_use": STALE}
        hf.save_pretrained(d)
    elif way == "processor_json":    # llava-hf processors: chat_template.json {"chat_template": "..."}
        hf.chat_template = None
        hf.save_pretrained(d)
        (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert sorted(p.name for p in d.iterdir())  # something was written


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return lambda: AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("way", ["config_str", "config_list", "jinja", "jinja_named", "processor_json"])
@pytest.mark.parametrize("which", ["smollm2", "llama3"])
def test_chat_template_read_from_every_place(hf_tokenizer, smollm2_dir, tmp_path, way, which):
    from transformers import AutoTokenizer

    from generate import Tokenizer
    hf = hf_tokenizer()
    template = hf.chat_template if which == "smollm2" else LLAMA3_TEMPLATE
    save_tokenizer(hf, tmp_path, template, way)
    ours = Tokenizer(tmp_path)
    ref = AutoTokenizer.from_pretrained(tmp_path)  # transformers reads the folder back itself
    for msgs in CHATS:
        # processor_json: a tokenizer does not read a processor's file, so the reference is given the template
        kw = {"chat_template": template} if way == "processor_json" else {}
        want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
        got = ours.apply_chat_template(msgs)
        assert got == want and "stale" not in got
        assert ours.encode(got) == ref(want, add_special_tokens=False)["input_ids"]


def test_no_chat_template_names_the_places(hf_tokenizer, tmp_path):
    from generate import Tokenizer
    hf = hf_tokenizer()
    hf.chat_template = None
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no chat template.*chat_template.jinja"):
        Tokenizer(tmp_path).apply_chat_template(CHATS[0])
