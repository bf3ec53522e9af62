#!/usr/bin/env bash
# Creates .venv with everything fairseq-distill needs; a no-op when it is already up to date.
# Order matters: torch first, pinned (a bare `torch` requirement would pull a multi-GB CUDA build),
# then fairseq and the rest, then this package in editable mode without dependency resolution.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=".venv/.setup-$(cat requirements.txt setup.py scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
echo "== setting up .venv (torch, fairseq, fairseq-distill)"
if [ ! -x .venv/bin/python ]; then
  if $PY -c "import torch" 2>/dev/null; then
    # A machine that already has torch (e.g. a GPU image) keeps it.
    $PY -m venv --system-site-packages .venv
  else
    $PY -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
# Triton: the GPU loss kernel's language. On a CPU machine the tests run that kernel in Triton's
# interpreter (TRITON_INTERPRET=1, tests/conftest.py). A GPU image brings the triton that matches its
# torch, which is kept.
if ! .venv/bin/python -c "import triton" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check triton==3.9.0
fi
# torchaudio comes with ve-fairseq's requirements but its 2.11 build does not load next to torch
# 2.13; fairseq only imports it for audio tasks, so it is removed rather than left broken.
if .venv/bin/python -m pip show -q torchaudio >/dev/null 2>&1 && ! .venv/bin/python -c "import torchaudio" >/dev/null 2>&1; then
  .venv/bin/pip uninstall -q -y torchaudio
fi
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
# Every Python start in .venv defers the scikit-learn and scipy imports of two fairseq modules that only
# GLUE and audio tasks use: about 3 s off each fairseq CLI's start-up on 2 cores (fairseq_distill_startup.py).
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import fairseq_distill_startup; fairseq_distill_startup.install()" > "$site/fairseq_distill_startup.pth"
rm -f .venv/.setup-*
touch "$stamp"
echo "== .venv ready: $(.venv/bin/python -c 'import torch, fairseq; print("torch", torch.__version__, "fairseq", fairseq.__version__)')"
