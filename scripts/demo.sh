#!/usr/bin/env bash
# The README's main command: the whole stack on embedded defaults (`pluristeer up`), then the demo
# client against it, then everything stopped again.
set -euo pipefail
BIN=${BIN:-.venv/bin}
PORT=${PORT:-8765}
URL="http://127.0.0.1:$PORT"

"$BIN/pluristeer" up --port "$PORT" &
UP=$!
trap 'kill -INT $UP 2>/dev/null || true; wait $UP 2>/dev/null || true' EXIT

for _ in $(seq 1 180); do
  if curl -sf "$URL/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$UP" 2>/dev/null; then echo "pluristeer up exited early" >&2; exit 1; fi
  sleep 1
done
"$BIN/pluristeer" demo --url "$URL" "$@"
