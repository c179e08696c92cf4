#!/usr/bin/env bash
# CI stage 1: the quick start exactly as the README prints it, before anything else is installed.
#
# `make run` from this checkout in a virtual environment holding only requirements.txt (on a
# clean clone that is .venv/ itself; where .venv/ already has the dev tools, a runtime-only one of
# its own), waits for "Ready", checks the environment is runtime-only and consistent (pip check),
# runs every shell block of the README against it (scripts/readme_commands.py: the agents pay and
# stream with the official clients, finance's commands run as printed), then checks every
# component is still up 30 s later (the quick start exits when one dies; /readyz; both workers
# answer a ping) and stops it with Ctrl-C. A failure prints the component logs.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p var
VENV=.venv
if [ -e .venv/.dev-installed ] || [ -e .venv/.ml-installed ]; then
  VENV=var/runtime-venv  # not a clean clone: keep the runtime-only promise in a venv of its own
  rm -rf "$VENV"
fi
OUT=var/quickstart.out
started=$SECONDS
pid=

say() { printf '\n== %s (%ss)\n' "$*" "$((SECONDS - started))"; }
finish() {
  local code=$?
  if [ -n "$pid" ] && pgrep -g "$pid" >/dev/null; then
    kill -INT -- "-$pid" 2>/dev/null || true  # Ctrl-C, as a user stops it: the quick start stops its components
    for _ in $(seq 1 60); do pgrep -g "$pid" >/dev/null || break; sleep 1; done
    if pgrep -g "$pid" >/dev/null; then
      echo "Ctrl-C did not stop the quick start in 60 s" >&2
      kill -KILL -- "-$pid" 2>/dev/null || true
      [ "$code" != 0 ] || code=1
    fi
  fi
  if [ "$code" = 0 ] && ss -ltn | grep -qE '127.0.0.1:(8000|8545) '; then
    echo "a component still listens after Ctrl-C:" >&2; ss -ltnp | grep -E ':(8000|8545) ' >&2; code=1
  fi
  if [ "$code" != 0 ]; then
    echo "quick-start smoke FAILED (exit $code); component logs:" >&2
    for f in "$OUT" var/worker.log var/anvil.log; do [ -f "$f" ] && { echo "----- $f" >&2; tail -n 80 "$f" >&2; }; done
  else
    echo "quick-start smoke passed in $((SECONDS - started))s"
  fi
  exit "$code"
}
trap finish EXIT
alive() { kill -0 "$pid" 2>/dev/null || { echo "make run exited:" >&2; tail -n 20 "$OUT" >&2; return 1; }; }

say "make run (runtime-only environment: $VENV)"
rm -f var/worker.log
# In its own session, with Ctrl-C's signal restored (a script's background job starts with it ignored).
python3 -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.setsid(); os.execvp("make", sys.argv[1:])' \
  make run VENV="$VENV" >"$OUT" 2>&1 &
pid=$!
for _ in $(seq 1 900); do
  grep -q "^Ready in" "$OUT" && break
  alive
  sleep 1
done
grep "^Ready in" "$OUT"

say "the environment holds the runtime requirements only, consistent"
"$VENV/bin/python" -m pip check
for dev in pytest x402 replicate; do
  if "$VENV/bin/python" -c "import $dev" 2>/dev/null; then echo "$dev is in the runtime environment" >&2; exit 1; fi
done

say "every shell block of the README, as printed"
python3 scripts/readme_commands.py
alive

say "30 s later, every component is still up"
sleep 30
alive
curl -fsS http://127.0.0.1:8000/readyz; echo
pongs=$("$VENV/bin/celery" -A x402site inspect ping -t 10 2>/dev/null | grep -c "pong" || true)
echo "workers answering: $pongs"
[ "$pongs" -ge 2 ]
