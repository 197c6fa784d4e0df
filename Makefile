# MasKD for Detectron2. `make test` sets everything up on a bare machine, then lints and tests.
PY := .venv/bin/python
SRC := projects tests tools demo configs train_net.py distill_net.py

.PHONY: setup lint format test test-fast mutation benchmark demo demo-seg benchmark-demo gpu-check

setup:
	@bash tools/setup_env.sh

lint: setup
	@$(PY) -m black -l 100 --check --quiet $(wildcard $(SRC)) || \
		(echo "black: run 'make format'" && exit 1)
	@$(PY) -m isort --check-only --quiet $(wildcard $(SRC)) || \
		(echo "isort: run 'make format'" && exit 1)

format: setup
	$(PY) -m isort --quiet $(wildcard $(SRC))
	$(PY) -m black -l 100 --quiet $(wildcard $(SRC))

# The suite in JOBS processes (pytest-xdist; a test file stays in one process, so its module
# fixtures are built once), one thread each, in the order pytest-randomly shuffles by SEED (the
# seed is printed; `make test SEED=` draws a new one, `SEED=N` repeats an order); the slowest
# tests are listed at the end.
JOBS ?= 2
SEED ?= 1
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS) --dist loadfile --durations=20 \
	$(if $(SEED),--randomly-seed=$(SEED))

test: lint
	$(PYTEST) tests

# everything but the tests marked slow (end-to-end trainings in subprocesses)
test-fast: lint
	$(PYTEST) -m "not slow" tests

# The mutation score of the modules that guard users' files and runs (tools/mutation.py, outside
# `make test`): mutmut over MODULES (default: all seven, docs/reliability.md) against the fast
# guard tests in JOBS processes; exit status 1 below 90% killed in all or 85% in a module.
mutation: setup
	$(PY) tools/mutation.py --max-children $(JOBS) $(if $(MODULES),--modules $(MODULES))

benchmark: setup
	$(PY) tools/benchmark_losses.py

# The main job: a real distillation on CPU, report in output/demo/report.md.
# QUICK=1: a tiny run that checks the pipeline. SEEDS=3: the students with three seeds.
# TEACHER_SEEDS=2, TOKEN_SEEDS=3: more teachers, more stage-1 runs per teacher.
# `make benchmark-demo`: the perturbation benchmark and mask-source ablation (docs/demo.md).
demo: setup
	$(PY) demo/run_demo.py $(if $(QUICK),--quick) $(if $(SEEDS),--seeds $(SEEDS)) \
		$(if $(TEACHER_SEEDS),--teacher-seeds $(TEACHER_SEEDS)) \
		$(if $(TOKEN_SEEDS),--token-seeds $(TOKEN_SEEDS)) \
		$(if $(QUICK),--output output/demo_quick)

# The paper's segmentation recipe on the output logits: a semantic FPN pair on the shapes data's
# label maps, 6 student seeds paired with their baselines; report in output/seg_demo/report.md.
# QUICK=1: a tiny run that checks the pipeline. SEEDS=3: three student seeds.
demo-seg: setup
	$(PY) demo/seg_demo.py $(if $(QUICK),--quick) $(if $(SEEDS),--seeds $(SEEDS)) \
		$(if $(QUICK),--output output/seg_demo_quick)

# Both data sets (default and detection-like): 2 teachers x 6 student seeds x 3 stage-1 seeds,
# the full recipe through the paper's tokens, the union objective's (configs/Demo/*_partition.yaml)
# and uniform masks, and features-only students through each source and the oracles
# (docs/demo.md, mask_sources.md).
PARTITION := MODEL.MASKD.WEIGHT_GATE union MODEL.MASKD.SALIENCY_WEIGHT 1.0 \
	MODEL.MASKD.MIN_TOKEN_AREA 0.08
BENCH := --teacher-seeds 2 --seeds 6 --token-seeds 3 --jobs 2 \
	--sources uniform gt_boxes gt_partition tokens tokens_variant \
	--full-sources uniform tokens_variant --variant-opts $(PARTITION)

benchmark-demo: setup
	$(PY) demo/run_demo.py --data detection $(BENCH) --output output/bench_detection
	$(PY) demo/run_demo.py $(BENCH) --output output/bench

# On a machine with a CUDA device: both stages (fp32 and AMP) and the benchmarks on the GPU, one
# summary; exit status 3 where there is no CUDA device. tools/gpu_check.py --dry-run: on CPU.
gpu-check: setup
	$(PY) tools/gpu_check.py
