#!/usr/bin/env bash
# Installs what keyward needs to build and test on Debian: SoftHSM2 (the dev
# and test HSM), protoc (compiles proto/), and for the tests strace, promtool
# (Debian's prometheus package), cargo-nextest and Python's eth-account (an
# independent EIP-712 verifier) and joserfc.
# Usage: scripts/deps.sh [--test]
set -euo pipefail

need=()
command -v softhsm2-util >/dev/null 2>&1 || need+=(softhsm2)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# The tests trace softhsm/init-token.sh's processes to prove no PIN is ever an argument.
if [ "${1:-}" = "--test" ]; then
  command -v strace >/dev/null 2>&1 || need+=(strace)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ "${1:-}" = "--test" ]; then
  # promtool checks and unit-tests deploy/prometheus/ (tests/dashboards.rs). Without
  # recommends: only the package, no node exporter.
  if ! command -v promtool >/dev/null 2>&1; then
    echo "installing Debian package: prometheus (for promtool)" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    [ ${#need[@]} -gt 0 ] || $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest" >&2
    cargo install --locked cargo-nextest
  fi
  if ! python3 -c 'import eth_account' >/dev/null 2>&1; then
    echo "installing eth-account (Python)" >&2
    python3 -m pip install --quiet eth-account
  fi
  python3 -c 'import joserfc' >/dev/null 2>&1 || python3 -m pip install --quiet joserfc
fi
