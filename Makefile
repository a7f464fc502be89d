# Colloquy — every entry point a person or CI uses.
SHELL := /bin/bash
PY := .venv/bin/python
PROTO_SRC := $(wildcard protos/colloquy/v1/*.proto)
PROTO_OUT := build/python/colloquy/v1/.stamp

.PHONY: setup protos kafka-up kafka-down test check lint demo chat up down model model-tiny bench clean images k8s-sync k8s-check build-moderation train-moderation eval-moderation reliability rollout-status rollback promote

## setup: install system packages, the Python env and generated code (idempotent)
setup:
	@bash scripts/setup.sh

## protos: generate Python code from protos/ (produced by the build, never edited)
protos: $(PROTO_OUT)
$(PROTO_OUT): $(PROTO_SRC)
	@mkdir -p build/python
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=build/python --pyi_out=build/python \
	  --grpc_python_out=build/python $(PROTO_SRC)
	@touch $@

## kafka-up / kafka-down: a real single-node KRaft broker on 127.0.0.1:9092
kafka-up:
	@bash scripts/kafka.sh up
kafka-down:
	@bash scripts/kafka.sh down

## model: build SmolLM2-135M-Instruct to ONNX (fp32 + int4), publish to the registry (cached; no-op when done)
# fp32 (the reference) and the three builds that carry the GGUF's own 4-bit blocks (in the graph of
# the builder's int4, which is built as their base but not scored: `make bench BENCH=model` scores
# it; cpu-int4-gguf-lut also builds the Rust custom op in model/kernels/q4_lut, skipped without
# cargo); the quality gate picks the served default (model/README.md). `python -m model.build --help`
# lists the others; MODEL_ARGS=--promote moves the served pointer to this build's default.
MODEL_VARIANTS ?= cpu-fp32,cpu-int4-gguf,cpu-int4-gguf-f32act,cpu-int4-gguf-lut
model: setup
	@HF_HUB_OFFLINE=1 $(PY) -m model.build --variants $(MODEL_VARIANTS) $(MODEL_ARGS)

model-tiny: setup
	@HF_HUB_OFFLINE=1 $(PY) -m model.tiny

## bench: the benchmark suite (bench/), tables on stdout, JSON/PNG and REPORT.md in bench/results/;
## BENCH=engine|stages|pipeline|conversation|report runs some (space-separated), BENCH_ARGS passes options.
## Stack benchmarks take /tmp/colloquy-stack.lock (flock) while their stack runs.
BENCH ?=
BENCH_ARGS ?=
bench: setup
	@bash bench/install.sh
	@HF_HUB_OFFLINE=1 $(PY) -m bench $(BENCH) $(BENCH_ARGS)

## test: the whole test suite against real Kafka, gRPC, Ray Serve and ONNX models
test: setup
	@bash scripts/test.sh

## check: the quick check for a change: lint + every test that needs no broker, Ray, model or stack
## (markers kafka, ray, model, pipeline deselected). `make test` is the whole suite (CI runs it).
check: setup
	$(PY) -m ruff check services model rlhf tests bench devtools
	$(PY) -m pytest -p no:cacheprovider -q -m "not kafka and not ray and not model and not pipeline"

lint: setup
	$(PY) -m ruff check services model rlhf tests bench devtools

## demo: set everything up and run the system (README's run command); REPLICAS=2 or
## REPLICAS="gateway=2 prompt=2" runs several replicas of every / those services (scripts/stack.sh)
demo: setup
	@REPLICAS="$(REPLICAS)" bash scripts/demo.sh

## chat: talk to the running stack in the terminal
chat:
	@$(PY) -m services.gateway.cli chat

## down: stop every service and Kafka
down:
	@bash scripts/down.sh

clean:
	rm -rf build var

## images: build the container images (needs a working docker; skipped otherwise)
images:
	@bash scripts/k8s-images.sh

## k8s-sync: regenerate k8s/ files derived from the code (serve config, topics, rules, dashboards)
k8s-sync:
	@bash scripts/k8s-sync.sh

## k8s-check: render both overlays and validate them offline
k8s-check: setup
	$(PY) -m pytest -q -p no:cacheprovider tests/k8s

## moderation: export MiniLM to ONNX (cached); train-moderation retrains the committed heads
build-moderation: setup
	@$(PY) -m services.moderation.build
train-moderation: build-moderation
	@$(PY) -m services.moderation.train
## eval-moderation: per-category precision/recall/F1 on held-out data (trains nothing)
eval-moderation: build-moderation
	@$(PY) -m bench.moderation_eval

## reliability: load, admission, faults, rolling restarts, hostile input, keyed retries, the per-user cap
## and a hostile backlog against the real stack (RELIABILITY_ARGS="--phases backlog": some phases only)
reliability: setup
	@HF_HUB_OFFLINE=1 $(PY) bench/reliability.py $(RELIABILITY_ARGS)

## promote VERSION=... [CANARY=10]: serve a registry version (to CANARY% of conversations first);
## rollback: back to the version served before; rollout-status: what is served
promote:
	@$(PY) -m services.generation.updates promote $(VERSION) --canary $(or $(CANARY),100)
rollback:
	@$(PY) -m services.generation.updates rollback
rollout-status:
	@$(PY) -m services.generation.updates status

## rlhf: reward model + PPO (or DPO, or both) on Ray Train from the feedback since the last run; publishes a new
## registry version (not promoted). RLHF_ARGS="--base V --source simulated --algorithm both" etc.
## rlhf-label: simulated labelers rank n answers through the running gateway (make demo first)
## rlhf-rounds: ROUNDS (2) rounds of label (rlhf-label) -> train -> evaluate -> publish, each from
## the previous round's child; each round's base is served (--serve-rounds) before the labelers ask the gateway
## RLHF_RECIPE=rlhf/recipes/smollm2-135m-cpu-dpo.env: the RLHF_* settings the real-model rounds ran with (its values win)
.PHONY: rlhf rlhf-label rlhf-rounds
ROUNDS ?= 2
RLHF_RECIPE ?=
RECIPE_ENV = $(if $(RLHF_RECIPE),set -a && . ./$(RLHF_RECIPE) && set +a &&)
rlhf: setup
	@$(RECIPE_ENV) HF_HUB_OFFLINE=1 $(PY) -m rlhf.job $(RLHF_ARGS)
rlhf-label:
	@$(PY) -m rlhf.labelers $(LABEL_ARGS)
rlhf-rounds: setup
	@$(RECIPE_ENV) HF_HUB_OFFLINE=1 $(PY) -m rlhf.job --rounds $(ROUNDS) --serve-rounds --label-command "$(PY) -m rlhf.labelers $(LABEL_ARGS)" $(RLHF_ARGS)
