#!/usr/bin/env bash
# The whole test suite: dependencies, formatting, lints, then every test (unit, integration,
# real etcd processes on loopback). Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build"
cargo build --workspace --bins
echo "== tests"
cargo test --workspace -- --test-threads 4
