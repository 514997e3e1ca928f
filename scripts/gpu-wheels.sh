#!/bin/bash
# Wheels of the packages that the lent GPU machine's image lacks (or holds too old) and that
# `cli.py compare` imports, for scripts/gpu-compare.sh: pydantic (the config) with its own needs,
# and rich/typer (the CLI) at the versions this venv holds. The image has torch, timm, numpy,
# OpenCV, scikit-learn, scipy, h5py, matplotlib and pyyaml; it has no pydicom, nibabel or wandb,
# which compare does not import. Writes .whl/ (ignored by git), to be carried:
#   bash scripts/gpu-wheels.sh
#   run carry [".whl"]: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#     --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; ... gpu-compare.sh
# The machine's Python is 3.12 (x86-64); pip's --platform must match a wheel's tag exactly, hence
# the list.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NAMES="pydantic pydantic_core annotated-types typing-inspection typing_extensions
  rich markdown-it-py mdurl pygments typer click shellingham annotated-doc"
rm -rf .whl; mkdir .whl
for name in $NAMES; do
  version=$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$version"
done
ls .whl
