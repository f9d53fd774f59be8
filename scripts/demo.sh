#!/usr/bin/env bash
# The README's main command: the whole stack on embedded defaults (`pluristeer up`, its output in a log
# file), the demo client against it, then everything stopped again. Arguments go to `pluristeer demo`
# (`--help` lists them). PORT and DEMO_LOG override where the stack listens and where its log goes.
#
# The demo runs in its own home: a fresh temporary PLURISTEER_HOME (its database, artifacts, key, log and
# results), so the groups, users and experiment it makes never reach your own database. The model is
# shared with your usual home ($PLURISTEER_HOME, else ~/.cache/pluristeer): fetched and converted there
# once. DEMO_HOME=<dir> runs it in that directory instead (kept, and reused when run again; your own
# home if you name it). The home is kept after the stack stops: its path is printed at the end.
set -euo pipefail
BIN=${BIN:-.venv/bin}
# The code of this checkout (run from its root), whichever checkout the venv's own script points at.
PLURISTEER=("$BIN/python" -m service.cli)
PORT=${PORT:-8765}
URL="http://127.0.0.1:$PORT"
MODEL_HOME=${PLURISTEER_HOME:-$HOME/.cache/pluristeer}
if [ -n "${DEMO_HOME:-}" ]; then
  mkdir -p "$DEMO_HOME"
  DEMO_HOME=$(cd "$DEMO_HOME" && pwd)
  WHOSE="DEMO_HOME"
else
  DEMO_HOME=$(mktemp -d "${TMPDIR:-/tmp}/pluristeer-demo.XXXXXX")
  WHOSE="a fresh one, not yours: DEMO_HOME=<dir> picks another"
fi
if [ ! -e "$DEMO_HOME/models" ] && [ "$(cd "$MODEL_HOME" 2>/dev/null && pwd)" != "$DEMO_HOME" ]; then
  mkdir -p "$MODEL_HOME/models"
  ln -s "$(cd "$MODEL_HOME/models" && pwd)" "$DEMO_HOME/models"
fi
export PLURISTEER_HOME=$DEMO_HOME
# Settings of the caller's own stack must not leak into the demo's.
unset DATABASE_URL REDIS_URL ARTIFACT_DIR PLURISTEER_STACK_STATUS
LOG=${DEMO_LOG:-$DEMO_HOME/stack.log}
mkdir -p "$(dirname "$LOG")"
STARTED=$SECONDS

echo "stack: starting (Redis, SQLite, a build worker, the API) with \`pluristeer up\`"
echo "       its home: $DEMO_HOME ($WHOSE)"
echo "       its log:  $LOG"
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
finished=0
on_exit() {
  stop_stack
  if [ "$finished" != 1 ]; then echo "kept:  $DEMO_HOME (the demo's home; its log: $LOG)" >&2; fi
}
trap on_exit EXIT

# Ready once the API has loaded the model (on a fresh machine it is fetched and converted first).
ready=0
for _ in $(seq 1 480); do
  if curl -sf "$URL/readyz" >/dev/null 2>&1; then ready=1; break; fi
  if ! kill -0 "$UP" 2>/dev/null; then break; fi
  sleep 1
done
if [ "$ready" != 1 ]; then
  echo "the stack did not become ready; the end of $LOG:" >&2
  tail -n 20 "$LOG" >&2
  exit 1
fi
echo "       up at $URL after $((SECONDS - STARTED)) s (console: $URL/console; API key in $DEMO_HOME/up.json)"

"${PLURISTEER[@]}" demo --url "$URL" "$@"
stop_stack
finished=1
echo "kept:  $DEMO_HOME (the demo's database, profiles, log and results)"
echo "       to look again: PLURISTEER_HOME=$DEMO_HOME $BIN/pluristeer up, then http://127.0.0.1:8000/console"
echo "demo finished in $(((SECONDS - STARTED) / 60)) min $(((SECONDS - STARTED) % 60)) s"
