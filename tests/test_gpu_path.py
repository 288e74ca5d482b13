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


# -----------------------------------------------------------------------------
# Hub downloads: exactly the HF-layout files, and the hub's real reason when it refuses

# The files of three paper-model repos as the hub lists them (main branch, 2025)
HUB_REPOS = {
    "meta-llama/Meta-Llama-3-8B-Instruct": [
        ".gitattributes", "LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
        "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors", "model.safetensors.index.json", "original/consolidated.00.pth",
        "original/params.json", "original/tokenizer.model", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"],
    "mistralai/Mistral-7B-Instruct-v0.3": [
        ".gitattributes", "README.md", "config.json", "consolidated.safetensors", "generation_config.json",
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
        "model.safetensors.index.json", "params.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer.model", "tokenizer.model.v3", "tokenizer_config.json"],
    "llava-hf/llava-v1.6-mistral-7b-hf": [
        ".gitattributes", "README.md", "added_tokens.json", "chat_template.json", "config.json",
        "generation_config.json", "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors", "model.safetensors.index.json",
        "preprocessor_config.json", "processor_config.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json"],
}
NEEDED = {"config.json", "generation_config.json", "model.safetensors.index.json", "special_tokens_map.json",
          "tokenizer.json", "tokenizer_config.json"}


@pytest.mark.parametrize("repo", sorted(HUB_REPOS))
def test_hub_download_fetches_exactly_the_hf_layout(repo):
    """snapshot_download filters the repo's files with filter_repo_objects(allow_patterns=HUB_FILES)."""
    from huggingface_hub.utils import filter_repo_objects

    from model import HUB_FILES
    files = HUB_REPOS[repo]
    got = set(filter_repo_objects(files, allow_patterns=list(HUB_FILES)))
    shards = {f for f in files if f.startswith("model-")}
    extra = {"chat_template.json", "preprocessor_config.json"} if "llava" in repo else set()
    assert got == NEEDED | shards | extra  # no consolidated.safetensors, original/*, params.json, README


def hub_error(cls, status, message):
    """An HTTP error as huggingface_hub raises it, with a response of its own HTTP library (httpx or
    httpx2, depending on the version)."""
    import importlib

    from huggingface_hub import errors
    http = importlib.import_module(errors.Response.__module__.split(".")[0])
    request = http.Request("GET", "https://huggingface.co/api/models/x/y/revision/main")
    return cls(message, response=http.Response(status, request=request))


@pytest.mark.parametrize("make_error,expected", [
    (lambda e: hub_error(e.GatedRepoError, 403, "403 Client Error.\nCannot access gated repo for url https://"
                         "huggingface.co/api/models/meta-llama/Meta-Llama-3-8B-Instruct.\nAccess to model "
                         "meta-llama/Meta-Llama-3-8B-Instruct is restricted."),
     r"gated repository: accept its license at https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct.*"
     r"GatedRepoError: Access to model meta-llama/Meta-Llama-3-8B-Instruct is restricted"),
    (lambda e: hub_error(e.RepositoryNotFoundError, 401, "401 Client Error.\nRepository Not Found for url: x.\n"
                         "Invalid username or password."),
     r"no such repository on the hub, or a private one and you are not logged in \(RepositoryNotFoundError: "
     r"Invalid username or password.\)"),
    (lambda e: e.LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub and we "
                                         "cannot find the appropriate snapshot folder in the local cache."),
     r"not in the local hub cache and the hub is unreachable"),
    (lambda e: hub_error(e.HfHubHTTPError, 500, "500 Server Error: Internal Server Error"),
     r"the hub download failed \(HfHubHTTPError: 500 Server Error"),
])
def test_hub_errors_say_why(monkeypatch, make_error, expected):
    import huggingface_hub
    from huggingface_hub import errors

    import cli
    from model import resolve_checkpoint
    err = make_error(errors)

    def refuse(*args, **kwargs):
        raise err
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(OSError, match=expected) as info:
        resolve_checkpoint("meta-llama/Meta-Llama-3-8B-Instruct")
    assert cli._expected(info.value) == str(info.value)  # cli.run prints it as one line, exit 2
    assert "\n" not in str(info.value)


# -----------------------------------------------------------------------------
# LLaVA configs that leave the vision tower or the anyres resolutions to transformers' defaults

VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "num_channels", "layer_norm_eps", "hidden_act")


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@pytest.mark.parametrize("vision", [None, {"model_type": "clip_vision_model", "hidden_size": 96}])
def test_llava_config_defaults_are_transformers(tmp_path, kind, vision):
    """No vision_config: CLIP-L/14-336 (LlavaConfig's default); a partial one: CLIPVisionConfig's
    defaults fill the rest; no image_grid_pinpoints: LlavaNextConfig's list. transformers reads the
    same config.json as the reference."""
    import transformers

    import vlm
    c = {"model_type": kind, "image_token_index": 32000, "text_config": {"model_type": "llama"}}
    if vision:
        c["vision_config"] = vision
    (tmp_path / "config.json").write_text(json.dumps(c))
    ours = vlm.VLMConfig.from_json(tmp_path / "config.json")
    ref = getattr(transformers, "LlavaConfig" if kind == "llava" else "LlavaNextConfig").from_json_file(
        tmp_path / "config.json")
    assert {k: getattr(ours.vision, k) for k in VISION_FIELDS} == {k: getattr(ref.vision_config, k) for k in VISION_FIELDS}
    assert ours.vision.patch_size == (32 if vision else 14)
    if kind == "llava_next":
        assert ours.grid_pinpoints == [list(p) for p in ref.image_grid_pinpoints]
        assert vlm.select_best_resolution((480, 640), ours.grid_pinpoints)  # used to be a TypeError on None
