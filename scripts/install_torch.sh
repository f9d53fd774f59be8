#!/usr/bin/env bash
# torch for this machine, before the rest of the install (so pip never picks a build by itself):
# - a GPU host (nvidia-smi lists a GPU): the default package index's build, which is the CUDA one;
# - otherwise the CPU build from PyTorch's CPU wheel index (the default index's Linux wheel is the
#   multi-GB CUDA build); where that index cannot be reached, the torch already installed, else the
#   default index's build.
# Usage: scripts/install_torch.sh VENV_BIN VERSION
set -euo pipefail
BIN=$1
VERSION=$2
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

installed() { "$BIN/python" -c "import torch; print(torch.__version__)" 2>/dev/null || true; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "torch: a GPU is present; torch==$VERSION from the default index (CUDA build)"
  exec "$BIN/pip" install --quiet "torch==$VERSION"
fi
case "$(installed)" in
  "$VERSION"|"$VERSION+cpu") echo "torch: $(installed) (CPU) already installed"; exit 0 ;;
esac
# A quick look first: where the index cannot be reached, pip would retry it for every dependency (minutes).
reachable() { "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)" \
  "$CPU_INDEX/torch/" >/dev/null 2>&1; }
echo "torch: no GPU; torch==$VERSION CPU build from $CPU_INDEX"
if reachable && "$BIN/pip" install --quiet --index-url "$CPU_INDEX" "torch==$VERSION"; then exit 0; fi
if [ -n "$(installed)" ]; then
  echo "torch: $CPU_INDEX is unreachable; keeping the installed torch $(installed)" >&2
  exit 0
fi
echo "torch: $CPU_INDEX is unreachable; torch==$VERSION from the default index" >&2
"$BIN/pip" install --quiet "torch==$VERSION"
