#!/usr/bin/env bash
# GPU check, through `evalq up` (embedded NATS + gateway + worker):
#   1. the tiny random transformers model on the GPU (device=cuda:0)
#   2. a num_gpus=1 job
#   3. num_gpus larger than the worker has is refused (422) once it advertised its GPUs
#   4. the warm evaluator: jobs forked from the zygote use CUDA, the zygote never initialises it
#   5. a sharded tiny-model job (shards=4) whose metrics equal the unsharded run's
#   6. the resident model: the second tiny job reused the model, and when a job for another
#      model comes, the resident process reports its CUDA memory released
# Needs a CUDA machine with evalq[worker] importable. GPU_CHECK_DEVICE=cpu runs it without one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda:0}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export EVALQ_HOME="${EVALQ_HOME:-$(mktemp -d -t evalq-gpu.XXXXXX)}"
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export EVALQ_NATS_URL="nats://127.0.0.1:${PORT}"
evalq() { $PY -m evalq "$@"; }
now() { date +%s.%N; }
elapsed() { $PY -c "print(f'{$2 - $1:.1f}')"; }

command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "no nvidia-smi"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count())'

# Not through the evalq function: $! must be the process itself, not a subshell, for the trap to stop it.
$PY -m evalq up --port "$PORT" >"$EVALQ_HOME/up.log" 2>&1 &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null || true; echo "--- up.log"; tail -20 "$EVALQ_HOME/up.log"' EXIT
for _ in $(seq 1 300); do grep -q "evalq up:" "$EVALQ_HOME/up.log" && break; kill -0 $UP; sleep 0.1; done

TINY="$EVALQ_HOME/tiny"
$PY tests/tiny_model.py "$TINY" >/dev/null
# The tiny model's config needs trust_remote_code: the pool allows it for local models under a root.
evalq setup --model-root "$EVALQ_HOME"

ARGS="pretrained=$TINY,trust_remote_code=True,device_map=$DEVICE"
t0=$(now)
evalq submit --model huggingface --model-args "$ARGS" --device "$DEVICE" --tasks evalq_demo --limit 8 \
  --label check=tiny-cuda --wait
t1=$(now)
evalq submit --model huggingface --model-args "$ARGS" --device "$DEVICE" --tasks evalq_demo --limit 8 \
  --label check=tiny-cuda-again --wait
t1b=$(now)
evalq submit --model huggingface --model-args "$ARGS" --device "$DEVICE" --tasks evalq_demo --num-gpus 1 \
  --label check=num-gpus-1 --wait
t2=$(now)
$PY scripts/gpu_warm_check.py "$TINY" "$DEVICE" | tee "$EVALQ_HOME/warm.txt"

# The resident model: was the second tiny job's model reused, and how much CUDA memory did the
# evaluation process hold with it?
reused_of() {
  $PY -c 'import asyncio, sys
from evalq import AsyncClient
async def main():
    async with AsyncClient() as client:
        events = [e async for e in client.watch(sys.argv[1])]
        s = next(e for e in events if type(e).__name__ == "Started")
        print(s.model_reused, s.model_load_seconds)
asyncio.run(main())' "$1"
}
R1=$(evalq submit --model huggingface --model-args "$ARGS" --device "$DEVICE" --tasks evalq_demo --limit 2 --json | \
  $PY -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
evalq watch "$R1" >/dev/null
R2=$(evalq submit --model huggingface --model-args "$ARGS" --device "$DEVICE" --tasks evalq_demo --limit 2 --json | \
  $PY -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
evalq watch "$R2" >/dev/null
REUSED="first: $(reused_of "$R1"); second: $(reused_of "$R2")"
evalq submit --model dummy --tasks evalq_demo --limit 2 --wait >/dev/null  # another model: releases the tiny one
LOADED=$(grep -h "evalq resident" "$EVALQ_HOME"/results/*/eval.log 2>/dev/null | tail -2 | tr '\n' ' ' || true)
RELEASED=$(grep -h "released" "$EVALQ_HOME"/worker/*/resident.log 2>/dev/null | tail -1 || true)

# Sharded against unsharded, the same request: every metric equal.
metrics() { evalq status "$1" --json | $PY -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["result"]["metrics"], sort_keys=True))'; }
job_of() { $PY -c 'import json,sys; print(json.load(sys.stdin)["job_id"])'; }
t3=$(now)
WHOLE=$(evalq submit --model huggingface --model-args "$ARGS" --device "$DEVICE" --tasks evalq_demo,evalq_shard_demo \
  --limit 40 --label check=unsharded --json | job_of)
evalq watch "$WHOLE" >/dev/null
t4=$(now)
SHARDED=$(evalq submit --model huggingface --model-args "$ARGS" --device "$DEVICE" --tasks evalq_demo,evalq_shard_demo \
  --limit 40 --shards 4 --label check=sharded --json | job_of)
evalq watch "$SHARDED" >/dev/null
t5=$(now)
if [ "$(metrics "$WHOLE")" = "$(metrics "$SHARDED")" ]; then SHARD_CHECK="equal"; else SHARD_CHECK="DIFFERENT"; fi
metrics "$SHARDED"

# The worker advertises its GPUs once it has listed them; then an impossible job is refused.
for _ in $(seq 1 240); do
  if evalq workers --json | $PY -c 'import json,sys; w=json.load(sys.stdin); sys.exit(0 if w and w[0]["tasks"] is not None else 1)'; then break; fi
  sleep 0.5
done
evalq workers
GPUS=$(evalq workers --json | $PY -c 'import json,sys; print(json.load(sys.stdin)[0]["gpu_count"])')
set +e
evalq submit --model huggingface --tasks evalq_demo --num-gpus $((GPUS + 1)) 2>"$EVALQ_HOME/refused.txt"
CODE=$?
set -e
cat "$EVALQ_HOME/refused.txt"
echo "== summary"
echo "tiny model on $DEVICE: $(elapsed "$t0" "$t1") s (submit to completed, the worker's warm-up included)"
echo "the same job again:    $(elapsed "$t1" "$t1b") s (on the resident model)"
echo "num_gpus=1 job:        $(elapsed "$t1b" "$t2") s"
echo "warm evaluator check:  $(tail -1 "$EVALQ_HOME/warm.txt")"
echo "sharded (4 pieces) vs unsharded metrics: $SHARD_CHECK ($(elapsed "$t4" "$t5") s sharded, $(elapsed "$t3" "$t4") s unsharded, one worker)"
echo "resident model (reused, load s): $REUSED"
echo "resident process while loaded: $LOADED"
echo "resident process on release:   $RELEASED"
echo "num_gpus=$((GPUS + 1)) refused:  exit $CODE ($(grep -o '\$\.num_gpus' "$EVALQ_HOME/refused.txt" || echo 'no path'))"
[ "$SHARD_CHECK" = "equal" ] || { echo "sharded metrics differ from the unsharded run" >&2; exit 1; }
