#!/usr/bin/env bash
# Python packages for the notebooks, the reference evaluators and the Python baseline.
# Idempotent: pip skips what is installed.
set -euo pipefail
python3 -m pip install --quiet --disable-pip-version-check \
  jupyter nbconvert ipykernel polars numpy matplotlib scikit-learn
