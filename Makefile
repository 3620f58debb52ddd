# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
# The pinned CPU torch is installed before anything else (a bare `torch` requirement would pull a
# multi-GB CUDA build); everything else comes from constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo demo-long demo-seeds ablations lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[train,deepspeed,vesl,eval,dev]"
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

# The same comparison after the CLIP baseline has learned shape (~25 min on a 2-core CPU)
demo-long: $(STAMP)
	$(PY) -m cloc_demo.demo --preset long --out runs/demo-long

# The documented headline: `make demo` with seeds 0, 1, 2 (mean ± std; each seed in runs/demo-seeds/seed<N>)
demo-seeds: $(STAMP)
	$(PY) -m cloc_demo.demo --preset demo --seeds 3 --out runs/demo-seeds

# The paper's Table 2 in miniature, 3 seeds (mean ± std; ablation deltas paired per seed)
ablations: $(STAMP)
	$(PY) -m cloc_demo.demo --preset ablations --seeds 3 --out runs/ablations

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
