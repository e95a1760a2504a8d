#!/usr/bin/env bash
# Installs the tools the ingest benchmark (examples/bench_ingest.rs) compares covd with:
#   lcov      Debian's package (lcov -a, the classic merge)
#   grcov     from crates.io (Mozilla's Rust merger)
#   coverage  coverage.py from PyPI (coverage combine)
# Each is skipped when already on PATH. Nothing here is needed to build or test covd.
set -euo pipefail

if ! command -v lcov >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq lcov
fi
if ! command -v grcov >/dev/null; then
    cargo install --locked grcov
fi
if ! python3 -c 'import coverage' 2>/dev/null; then
    python3 -m pip install --quiet coverage
fi
echo "lcov:     $(lcov --version | head -1)"
echo "grcov:    $(grcov --version)"
echo "coverage: $(python3 -m coverage --version | head -1)"
