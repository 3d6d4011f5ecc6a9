# Two commands do everything on a fresh machine: `make train export DATA=...` and `make test`.
# Every target depends on the virtual environment, so the first one sets it up.
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
DATA     ?= ../shared/data/pbc_dev
RUN      ?=
PRESET   ?=
ARCH     ?=
ARGS     ?=
# every target but `app` uses runs/default when RUN is not given (`app` then opens the shipped model)
RUN_NAME := $(or $(RUN),default)
RUN_DIR  := runs/$(RUN_NAME)

.PHONY: install train export verify evaluate app app-assets test test-slow bench bench-tables bench-train-speed \
        bench-gpu bench-flops train-all finetune bench-finetune bench-robustness bench-distance release-model clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	# torch/torchvision first, pinned: the pair executorch 1.5.1 runs with
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[all]'
	touch $@

train: install
	$(PY) -m train --data $(DATA) --run-dir $(RUN_DIR) $(if $(PRESET),--preset $(PRESET)) $(if $(ARCH),--arch $(ARCH)) \
	    $(if $(wildcard $(RUN_DIR)/last.pt),--resume) $(ARGS)

export: install
	$(PY) -m export --run-dir $(RUN_DIR) $(if $(NOT_A_CELL),--not-a-white-cell $(NOT_A_CELL)) $(if $(TTA),--tta $(TTA))
	$(PY) -m export.verify --run-dir $(RUN_DIR)

verify: install
	$(PY) -m export.verify --run-dir $(RUN_DIR) $(if $(filter-out ../shared/data/pbc_dev,$(DATA)),--data $(DATA))

evaluate: install
	$(PY) -m train.evaluate --run-dir $(RUN_DIR) $(if $(filter-out ../shared/data/pbc_dev,$(DATA)),--data $(DATA))

# The desktop app: with RUN, that run's model; without, the model shipped in mobile_app/assets/model/.
# app-assets copies a run's model + manifest into mobile_app/assets/model/.
app: install
	$(PY) -m mobile_app run $(if $(RUN),--model-dir $(RUN_DIR)/export)

app-assets: install
	$(PY) -m mobile_app bundle --model-dir $(RUN_DIR)/export $(if $(FORMAT),--format $(FORMAT))

# The app's shipped model (mobile_app/assets/model/): train the crosslab preset into runs/release-crosslab (resumes), export,
# verify on the test split, bundle the smallest ONNX/ExecuTorch file that passed + manifest + MODEL_CARD.md, say whether
# it equals the committed bundle.
release-model: install
	$(PY) -m export.release --data $(DATA) $(ARGS)

test: install
	$(PY) -m pytest -m "not slow" $(ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(ARGS)

bench: install
	$(PY) -m benchmarks.latency --run $(RUN_NAME) $(ARGS)

bench-tables: install
	$(PY) -m benchmarks.paper_tables $(ARGS)

bench-flops: install
	$(PY) -m benchmarks.flops

bench-train-speed: install
	$(PY) -m benchmarks.train_speed $(ARGS)

# GPU training speed (issue 12): model step eager vs torch.compile, a few epochs of the paper preset end to end
# -> runs/bench/gpu_train.{md,json}; ARGS="--mode augment" compares the paper preset's augmentations instead.
bench-gpu: install
	$(PY) -m benchmarks.gpu_train --data $(DATA) $(ARGS)

train-all: install
	$(PY) -m benchmarks.train_all --data $(DATA) $(if $(PRESET),--preset $(PRESET)) $(ARGS)

# Accuracy and abstention of best.pt and every artifact under synthetic acquisition shifts (+ DATA unshifted
# when it is not pbc_dev) -> runs/RUN/bench/robustness.{json,md,png}, e.g.
#   make bench-robustness RUN=gpu_c_rc_od_ls DATA=../shared/data/crosslab_dev ARGS="--images 100"
bench-robustness: install
	$(PY) -m benchmarks.robustness --run-dir $(RUN_DIR) $(if $(filter-out ../shared/data/pbc_dev,$(DATA)),--data $(DATA)) $(ARGS)

# the feature distance's thresholds, tried on PyTorch: runs/RUN/bench/feature_distance.{md,json}
bench-distance: install
	$(PY) -m benchmarks.feature_distance --run-dir $(RUN_DIR) $(if $(filter-out ../shared/data/pbc_dev,$(DATA)),--data $(DATA)) $(ARGS)

# Adapt a trained run to a new lab from a few labelled cells: FROM is a run name (runs/FROM) or a path,
# DATA the new lab's class folders (required: not the pbc_dev default), RUN the new run, e.g.
#   make finetune FROM=gpu_c_rc_od_ls DATA=../shared/data/crosslab_dev RUN=crosslab_k10 ARGS="--shots 10"
# bench-finetune: held-out accuracy for K = 5 10 20 shots x 3 draws -> runs/bench/finetune_kshot.{json,md}.
FROM_PATH = $(if $(wildcard runs/$(FROM)),runs/$(FROM),$(FROM))
NEED_FROM_DATA = $(if $(FROM),,$(error $@ needs FROM=<run name or checkpoint path>))$(if $(filter file,$(origin DATA)),$(error \
                 $@ needs DATA=<the new lab's labelled folder>, e.g. DATA=../shared/data/crosslab_dev))

finetune: install
	$(NEED_FROM_DATA)$(PY) -m train.finetune --from $(FROM_PATH) --data $(DATA) --run-dir $(RUN_DIR) $(ARGS)

bench-finetune: install
	$(NEED_FROM_DATA)$(PY) -m benchmarks.finetune_kshot --from $(FROM_PATH) --data $(DATA) $(ARGS)

clean:
	rm -rf runs/smoke* .pytest_cache
