#!/usr/bin/env sh
# Drive evalq with nothing but the `nats` CLI (https://github.com/nats-io/natscli).
# Every subject, bucket and body below is the wire contract; no evalq install is needed.
#   NATS_URL=nats://127.0.0.1:4222 sh examples/nats_cli.sh
set -eu
S="${NATS_URL:-nats://127.0.0.1:4222}"

# Submit: the reply is a JobAccepted (job_id, position_in_queue, stream_seq, ...).
JOB=$(nats --server "$S" req evalq.submit '{"model": "dummy", "tasks": ["evalq_demo"], "limit": 4, "labels": {"from": "shell"}}' --raw | sed -n 's/.*"job_id":"\([^"]*\)".*/\1/p')
echo "submitted $JOB"

# Status and the queue, as JSON.
nats --server "$S" req evalq.status "{\"job_id\": \"$JOB\"}" --raw
nats --server "$S" req evalq.queue '{}' --raw

# Wait for the job's terminal event as it is published (`nats sub 'evalq.events.>'`
# shows every job; the EVALQ_EVENTS stream keeps the history for late readers).
nats --server "$S" sub "evalq.events.*.$JOB.completed" --count=1

# The job's record, and its results file from the object store.
nats --server "$S" kv get evalq-jobs "$JOB" --raw
nats --server "$S" object get evalq-results "$JOB/results.json" --output=results.json
