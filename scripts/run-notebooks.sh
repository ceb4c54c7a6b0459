#!/usr/bin/env bash
# Executes every notebook in notebooks/ into a temporary directory; fails on the first error.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for nb in notebooks/*.ipynb; do
  echo "running $nb"
  jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=600 \
    --output-dir "$out" "$nb"
done
echo "notebooks: all ran"
