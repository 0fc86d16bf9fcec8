#!/usr/bin/env bash
# The demo: `evalq up` (embedded NATS + gateway + worker), then one real lmms-eval job
# (the dummy model on the packaged evalq_demo task) followed live to its metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
EVALQ=.venv/bin/evalq
export EVALQ_HOME="${EVALQ_HOME:-$(mktemp -d -t evalq-demo.XXXXXX)}"
PORT="${EVALQ_DEMO_PORT:-$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export EVALQ_NATS_URL="nats://127.0.0.1:${PORT}"
LOG="$EVALQ_HOME/up.log"

echo "== evalq up (nats-server, gateway and worker in one process; state in $EVALQ_HOME)"
$EVALQ up --port "$PORT" >"$LOG" 2>&1 &
UP_PID=$!
trap 'kill -TERM $UP_PID 2>/dev/null; wait $UP_PID 2>/dev/null || true' EXIT

for _ in $(seq 1 300); do
  if grep -q "evalq up:" "$LOG" 2>/dev/null; then break; fi
  if ! kill -0 $UP_PID 2>/dev/null; then cat "$LOG"; exit 1; fi
  sleep 0.1
done
cat "$LOG"

echo
echo "== submit three jobs: the first runs, the others wait behind it"
$EVALQ submit --model dummy --tasks evalq_demo --label demo=1
SECOND=$($EVALQ submit --model dummy --tasks evalq_demo --limit 4 --label demo=2 --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
echo "accepted $SECOND (second in line)"
$EVALQ submit --model dummy --tasks evalq_demo --limit 4 --label demo=3
echo
echo "== the queue"
$EVALQ queue
echo
echo "== cancel the second job while it waits"
$EVALQ cancel "$SECOND"
echo
echo "== one more job, followed live to its metrics (exact_match is 0.6: the dummy model answers A)"
$EVALQ submit --model dummy --tasks evalq_demo --label demo=4 --wait
echo
echo "== the queue after the run"
$EVALQ queue
