#!/usr/bin/env bash
# Install evalq as a user does and use it: build the wheel and the sdist, install the wheel
# without extras into a fresh venv, and check that this client-only install
#   - imports without torch or lmms-eval (neither is installed, nor loaded by `import evalq`);
#   - ships py.typed and the bundled tasks;
#   - answers `--help` and `--version`, and names the extra a service command needs (exit 2);
#   - submits, watches and downloads results from a queue that the dev venv runs (`evalq up`);
#   - type-checks a user script (examples/typed_client.py) with `mypy --strict`, and runs it.
# `make client-check` runs it; CI runs it after the tests. Needs PyPI for the venv's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEV=${DEV_PYTHON:-$REPO/.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/evalq-client-check.XXXXXX")
QUEUE_PID=

cleanup() {
    if [[ -n $QUEUE_PID ]] && kill -0 "$QUEUE_PID" 2>/dev/null; then
        kill -INT "$QUEUE_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$QUEUE_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$QUEUE_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '== %s\n' "$*"; }
fail() {
    printf 'client-check FAILED: %s\n' "$*" >&2
    if [[ -f $WORK/queue.log ]]; then
        echo "--- queue log (last 30 lines)" >&2
        tail -n 30 "$WORK/queue.log" >&2
    fi
    exit 1
}

step "build the sdist, then the wheel from it"
"$DEV" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; fail "build"; }
WHEEL=$(ls "$WORK"/dist/evalq-*.whl)
SDIST=$(ls "$WORK"/dist/evalq-*.tar.gz)
WHEEL_FILES=$("$DEV" -m zipfile -l "$WHEEL")
SDIST_FILES=$(tar -tzf "$SDIST")
for wanted in evalq/py.typed evalq/tasks/evalq_demo/evalq_demo.yaml.in evalq/tasks/evalq_demo/evalq_demo.jsonl; do
    grep -q "^$wanted " <<<"$WHEEL_FILES" || fail "the wheel lacks $wanted"
    grep -q "/src/$wanted\$" <<<"$SDIST_FILES" || fail "the sdist lacks $wanted"
done

step "install the wheel, without extras, into a fresh venv"
"$DEV" -m venv "$WORK/venv"
USER_PY=$WORK/venv/bin/python
USER_EVALQ=$WORK/venv/bin/evalq
# The user's environment: no source checkout on the path, no nats-server on PATH.
unset PYTHONPATH
CLEAN_PATH=$(tr ':' '\n' <<<"${PATH}" | while read -r dir; do
    [[ -n $dir && ! -e $dir/nats-server ]] && printf '%s:' "$dir"
done)
CLEAN_PATH=${CLEAN_PATH%:}
"$USER_PY" -m pip install --quiet --disable-pip-version-check "$WHEEL" || fail "pip install of the wheel"
du -sh "$WORK/venv" | sed 's/^/   venv size: /'

step "import evalq loads neither torch nor lmms-eval"
"$USER_PY" - <<'EOF' || fail "the client-only install pulls in the worker's packages"
import importlib.util
import sys

import evalq
import evalq.cli  # the command's module too

for name in ("torch", "lmms_eval", "transformers"):
    assert name not in sys.modules, f"import evalq loaded {name}"
    assert importlib.util.find_spec(name) is None, f"{name} is installed without the worker extra"
assert evalq.__file__ and "site-packages" in evalq.__file__, evalq.__file__
print(f"   evalq {evalq.__version__} from {evalq.__file__}")
EOF

step "evalq --help, --version, and the missing extras"
"$USER_EVALQ" --help >/dev/null || fail "evalq --help"
version=$("$USER_EVALQ" --version)
expected=$("$USER_PY" -c 'from importlib.metadata import version; print("evalq", version("evalq"))')
[[ $version == "$expected" ]] || fail "evalq --version says '$version', the metadata '$expected'"
expect_extra() {  # command, extra
    local out code=0
    out=$(PATH=$CLEAN_PATH EVALQ_NATS_URL=nats://127.0.0.1:1 EVALQ_HOME=$WORK/nohome \
        timeout 30 "$USER_EVALQ" "$1" 2>&1) || code=$?
    [[ $code == 2 ]] || fail "evalq $1 exited $code, not 2: $out"
    [[ $(wc -l <<<"$out") == 1 && $out == *"pip install 'evalq[$2]'" ]] || fail "evalq $1 said: $out"
    echo "   evalq $1: $out"
}
expect_extra worker worker
expect_extra up worker
if PATH=$CLEAN_PATH command -v nats-server >/dev/null; then
    echo "   (nats-server is installed system-wide: evalq server has what it needs)"
else
    expect_extra server server
fi

step "a queue from the dev venv (evalq up)"
PORT=$("$DEV" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export EVALQ_NATS_URL=nats://127.0.0.1:$PORT EVALQ_PREFIX=clientcheck EVALQ_HOME=$WORK/home
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTHONPATH=$REPO/src "$DEV" -m evalq up --port "$PORT" >"$WORK/queue.log" 2>&1 &
QUEUE_PID=$!
for _ in $(seq 120); do
    "$USER_EVALQ" health >/dev/null 2>&1 && break
    kill -0 "$QUEUE_PID" 2>/dev/null || fail "evalq up exited"
    sleep 0.5
done
"$USER_EVALQ" health || fail "the queue did not answer within 60 s"

step "submit, watch and results from the client-only install"
JOB=$("$USER_EVALQ" submit --model dummy --tasks evalq_demo --limit 4 --label by=client-check --json |
    "$USER_PY" -c 'import json, sys; print(json.load(sys.stdin)["job_id"])') || fail "evalq submit"
echo "   job $JOB"
"$USER_EVALQ" watch "$JOB" --timeout 180 || fail "evalq watch (exit $?)"
"$USER_EVALQ" results "$JOB" -o "$WORK/results" || fail "evalq results"
[[ -f $WORK/results/$JOB/results.json && -f $WORK/results/$JOB/eval.log ]] ||
    fail "evalq results did not write results.json and eval.log"

step "mypy --strict on a user script, against the installed wheel"
mkdir -p "$WORK/user"
cp examples/typed_client.py "$WORK/user/"
# From a folder with no configuration, so only the installed package (and its py.typed) is seen.
(cd "$WORK/user" && "$DEV" -m mypy --strict --no-incremental --python-executable "$USER_PY" typed_client.py) ||
    fail "mypy --strict on examples/typed_client.py"

step "the user script runs"
(cd "$WORK/user" && "$USER_PY" typed_client.py --limit 2 --output "$WORK/user/runs") || fail "examples/typed_client.py"

echo "client-check passed"
