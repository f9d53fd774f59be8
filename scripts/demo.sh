#!/usr/bin/env bash
# The README's main command: the whole stack on embedded defaults (`pluristeer up`, its output in a log
# file), the demo client against it, then everything stopped again. Arguments go to `pluristeer demo`
# (`--help` lists them). PORT and DEMO_LOG override where the stack listens and where its log goes.
set -euo pipefail
BIN=${BIN:-.venv/bin}
# The code of this checkout (run from its root), whichever checkout the venv's own script points at.
PLURISTEER=("$BIN/python" -m service.cli)
PORT=${PORT:-8765}
URL="http://127.0.0.1:$PORT"
LOG=${DEMO_LOG:-.pluristeer/demo-stack.log}
mkdir -p "$(dirname "$LOG")"
STARTED=$SECONDS

echo "stack: starting (Redis, SQLite, a build worker, the API) with \`pluristeer up\`"
echo "       its log: $LOG"
"${PLURISTEER[@]}" up --port "$PORT" >"$LOG" 2>&1 &
UP=$!
# SIGTERM, not SIGINT: a non-interactive shell starts background jobs with SIGINT ignored.
stop_stack() {
  if kill -0 "$UP" 2>/dev/null; then
    echo "stopping the stack"
    kill -TERM "$UP" 2>/dev/null || true
  fi
  wait "$UP" 2>/dev/null || true
}
trap stop_stack EXIT

ready=0
for _ in $(seq 1 240); do
  if curl -sf "$URL/readyz" >/dev/null 2>&1; then ready=1; break; fi
  if ! kill -0 "$UP" 2>/dev/null; then break; fi
  sleep 1
done
if [ "$ready" != 1 ]; then
  echo "the stack did not become ready; the end of $LOG:" >&2
  tail -n 20 "$LOG" >&2
  exit 1
fi
echo "       up at $URL after $((SECONDS - STARTED)) s (API key saved by \`up\`; see the log)"

"${PLURISTEER[@]}" demo --url "$URL" "$@"
stop_stack
echo "demo finished in $(((SECONDS - STARTED) / 60)) min $(((SECONDS - STARTED) % 60)) s"
