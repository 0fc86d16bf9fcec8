#!/bin/sh
# A stand-in for `python -m lmms_eval` of a fixed length, for scheduling tests: it sleeps the
# `seconds=` of its `--model_args` (default 1) and writes a valid results file.
seconds=1
for arg in "$@"; do
  case "$arg" in
    --output_path=*) out="${arg#--output_path=}" ;;
    --tasks=*) tasks="${arg#--tasks=}" ;;
    --model_args=*) args="${arg#--model_args=}" ;;
  esac
done
for pair in $(printf '%s' "$args" | tr ',' ' '); do
  case "$pair" in seconds=*) seconds="${pair#seconds=}" ;; esac
done
task="${tasks%%,*}"
sleep "$seconds"
printf 'Model Responding: 100%%|##########| 1/1 [00:00<00:00]\n' >&2
mkdir -p "$out"
printf '{"results": {"%s": {"alias": "%s", "exact_match,none": 0.6}}}\n' "$task" "$task" >"$out/19700101_000000_results.json"
