#!/usr/bin/env bash
# Fetches, on this (CPU) machine, the wheels that the GPU machine lacks into ./.whl (git-ignored), for
# Python 3.12 on x86-64: fairseq (ve-fairseq), hydra/omegaconf/antlr4, bitarray, cffi, rouge-score, nltk,
# rapidfuzz (cross-tokenizer KD; distill_plugins imports it with its criterions).
# benchmarks/gpu_checks.sh installs these with --no-deps into /tmp/site. About 23 MB.
# The rest of requirements.txt is on the GPU image (the device library's KINDS.md, read 2026-11-17;
# tests/test_gpu_wheels.py checks that every requirement is one or the other):
# ON_IMAGE: numpy sentencepiece absl-py sacrebleu PyYAML matplotlib tqdm pytest pytest-xdist execnet filelock transformers huggingface_hub tokenizers safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pip_() { python3 -m pip "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
BINARY=(ve-fairseq==0.12.3 hydra-core==1.3.8 omegaconf==2.3.1 bitarray==3.12.3 cffi==2.1.1 nltk==3.10.4 rapidfuzz==3.14.6)
SOURCE=(antlr4-python3-runtime==4.9.3 rouge-score==0.1.2)  # published as source only: built here, they run anywhere
pip_ download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl "${BINARY[@]}"
pip_ wheel -q --no-deps -w .whl "${SOURCE[@]}"
ls .whl
# pip's failures are filtered above: check that every wheel came (a missing one would fail every GPU stage)
missing=()
for req in "${BINARY[@]}" "${SOURCE[@]}"; do
  w=${req//-/_}  # a wheel's file name: name-version, dashes of the name as underscores
  compgen -G ".whl/${w/==/-}-*.whl" > /dev/null || missing+=("$req")
done
[ ${#missing[@]} -eq 0 ] || { echo "gpu_wheels.sh: not fetched: ${missing[*]} (is the package index reachable?)"; exit 1; }
