# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
# The pinned CPU torch is installed before anything else (a bare `torch` requirement would pull a
# multi-GB CUDA build); everything else comes from constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo demo-long demo-seeds demo-mllm ablations lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[train,deepspeed,vesl,eval,dev,app]"
	# open_clip's wheel carries OpenAI's CLIP BPE merges; we only read that data file (no import,
	# no torchvision), so the offline CLIP tokenizer works without any hub access.
	$(PY) -m pip install -q --no-deps -c constraints.txt open_clip_torch
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow"

# The paper in miniature: synthetic scenes, CLOC vs CLIP pretraining, evaluation, runs/demo/report.md
demo: $(STAMP)
	$(PY) -m cloc_demo.demo --preset demo --out runs/demo

# The same comparison after the CLIP baseline has learned shape, plus CLIP at CLOC's wall-clock (~1 h on a
# 2-core CPU: three runs of 1,500 steps)
demo-long: $(STAMP)
	$(PY) -m cloc_demo.demo --preset long --out runs/demo-long

# The documented headline: `make demo` plus the noisy-label row with seeds 0, 1, 2 (mean ± std; each seed in
# runs/demo-seeds/seed<N>); --reuse: when stopped, the next call loads the runs that had finished
demo-seeds: $(STAMP)
	$(PY) -m cloc_demo.demo --preset headline --seeds 3 --reuse --out runs/demo-seeds

# The MLLM claim in miniature: CLOC vs CLIP towers inside a tiny LLaVA, from `make demo`'s checkpoints
# (runs the demo's job first when they are missing); two fine-tuning runs at once, one thread each
# -> runs/demo-mllm/report.md
demo-mllm: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m cloc_demo.demo_mllm --workers 2 --out runs/demo-mllm

# The paper's Table 2 in miniature, 3 seeds (mean ± std; ablation deltas paired per seed)
ablations: $(STAMP)
	$(PY) -m cloc_demo.demo --preset ablations --seeds 3 --reuse --out runs/ablations

# The demo page over the checkpoints of `make demo` and `make demo-mllm` (each run first when its default
# checkpoint is missing); prints the URL. Other folders: make app APP_CLOC=... APP_CLIP=... APP_MLLM=...
APP_CLOC ?= runs/demo/cloc
APP_CLIP ?= runs/demo/clip
APP_MLLM ?= runs/demo-mllm/cloc-llava
.PHONY: app
app: $(STAMP)
	@if { [ ! -f $(APP_CLOC)/config.json ] && [ "$(APP_CLOC)" = runs/demo/cloc ]; } || \
	    { [ ! -f $(APP_CLIP)/config.json ] && [ "$(APP_CLIP)" = runs/demo/clip ]; }; then $(MAKE) demo; fi
	@if [ ! -f $(APP_MLLM)/config.json ] && [ "$(APP_MLLM)" = runs/demo-mllm/cloc-llava ]; then $(MAKE) demo-mllm; fi
	$(PY) -m cloc_demo.app --cloc $(APP_CLOC) --clip $(APP_CLIP) --mllm $(APP_MLLM) $(APP_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
