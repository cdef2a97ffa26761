# Two commands for a fresh machine (each sets up .venv itself):
#   make demo   - the main job on the embedded default: the Dagster demo chain (procedural MIS -> features ->
#                 M2M-Self / M2M-DINO training -> evaluation), recorded in a persistent DAGSTER_HOME
#   make test   - the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export HF_HUB_OFFLINE ?= 1
DAGSTER_HOME ?= $(CURDIR)/.state/dagster
export DAGSTER_HOME
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv demo test smoke ui ui-check cluster-smoke redis state bench cli-demo clean paper-dryrun

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the wheels this project is tested with (CPU or CUDA build, same API)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,orchestration]'
	rm -f $(VENV)/.installed-*; touch $@

state: $(DAGSTER_HOME)/dagster.yaml
$(DAGSTER_HOME)/dagster.yaml: m2m_pipeline/orchestration/dagster.yaml | $(STAMP)
	mkdir -p $(DAGSTER_HOME) .state/mlflow
	cp m2m_pipeline/orchestration/dagster.yaml $@
	# create the instance storage once: concurrent first runs would race in Dagster's own setup
	$(BIN)/dagster instance migrate

demo: $(STAMP) state
	$(BIN)/dagster job execute -m m2m_pipeline.definitions -j m2m_demo_job -c m2m_pipeline/configs/demo.yaml

test: $(STAMP) redis
	$(BIN)/python -m pytest -q

# redis-server for the Celery broker of the cluster profile (Debian's package, installed when missing, as root)
redis:
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } \
	  || { echo "the cluster profile needs redis-server: apt-get install redis-server"; exit 1; }

# The scale-out path on this machine (issue 16): Redis on 127.0.0.1, three Celery workers (queues gpu x2,
# default), one Dagster run per MIS partition, a worker SIGKILLed mid-shard and retried, the broker restarted,
# shards compared with a single-process run. Report: runs/cluster-smoke/report.json.
cluster-smoke: $(STAMP) state redis
	$(BIN)/python -m m2m_pipeline.orchestration.cluster --out runs/cluster-smoke

smoke: $(STAMP) state
	$(BIN)/dagster job execute -m m2m_pipeline.definitions -j m2m_smoke_job -c m2m_pipeline/configs/smoke.yaml
	$(BIN)/python -m m2m_pipeline.orchestration.verify --profile smoke

ui: $(STAMP) state
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.state/mlflow/mlflow.db --host 127.0.0.1 --port 5000 & \
	trap "kill $$!" EXIT; $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# The Dagster UI renders every asset page of the profile's latest materializations (CI: after make smoke), in
# headless Chromium: Debian's package, installed here when missing and run as root (Playwright's own browser
# download needs the internet). Screenshots land in runs/ui-check-$(UI_PROFILE).
UI_PROFILE ?= smoke
ui-check: $(STAMP) state
	@[ -n "$$M2M_CHROMIUM" ] || command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || { echo "ui-check needs Chromium: apt-get install chromium (or set M2M_CHROMIUM=/path/to/chrome)"; exit 1; }
	$(BIN)/python -m m2m_pipeline.orchestration.ui_check --profile $(UI_PROFILE) --out runs/ui-check-$(UI_PROFILE)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_sampling.py --preset demo

# Every stage of the Dagster paper job on random weights in the released SD-2.1-base / DINOv2-giant layouts
# (in-process executor, one caption per split): seconds and peak memory per stage. ~20 GiB; not in CI (its
# small-shape twin is tests/orchestration/test_paper_dryrun.py). DRYRUN_SCALE=small for the narrow networks.
DRYRUN_SCALE ?= full
paper-dryrun: $(STAMP)
	$(BIN)/python -m m2m_pipeline.orchestration.dryrun --out runs/paper-dryrun-$(DRYRUN_SCALE) --scale $(DRYRUN_SCALE)

cli-demo: $(STAMP)
	$(BIN)/m2m demo --preset demo --variant self --steps 300 --out runs/demo

clean:
	rm -rf runs .pytest_cache
