#!/usr/bin/env bash
# Python packages for the notebooks, the reference evaluators and the Python baseline.
# Idempotent: pip skips what is installed. On a Debian system Python (PEP 668,
# "externally managed") pip refuses plain installs; the packages then go in with
# --break-system-packages (CI machines are throwaway; use a venv on your own).
set -euo pipefail
pkgs=(jupyter nbconvert ipykernel polars numpy matplotlib scikit-learn)
if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "py-deps.sh: installing python3-pip" >&2
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
fi
pip=(python3 -m pip install --quiet --disable-pip-version-check)
if ! "${pip[@]}" "${pkgs[@]}"; then
    echo "py-deps.sh: retrying with --break-system-packages (externally managed Python)" >&2
    "${pip[@]}" --break-system-packages "${pkgs[@]}"
fi
