#!/usr/bin/env bash
# The whole test suite: dependencies, formatting, lints, then every test (unit, integration,
# real etcd processes on loopback). Run as root on Debian 12.
#
# DEBVISOR_REQUIRE_ALL=1 (set by .ci/run; taken from the caller, never set here) makes a test
# fail where it would skip for something the machine could provide (root, KVM, packages).
# Every skip is listed in the "skip summary" printed at the end, whatever the outcome.
set -euo pipefail
cd "$(dirname "$0")/.."

skip_log=$(mktemp -t debvisor-skips.XXXXXX)
export DEBVISOR_SKIP_LOG="$skip_log"
skip_summary() {
    local rc=$?
    echo "== skip summary"
    local n
    n=$(wc -l <"$skip_log" || echo 0)
    if [ "$n" -eq 0 ]; then
        echo "no skips"
    else
        echo "$n skipped (test, reason, kind):"
        cat "$skip_log"
    fi
    rm -f "$skip_log"
    exit "$rc"
}
trap skip_summary EXIT

./scripts/deps.sh --test
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build"
cargo build --workspace --bins
if [ "${DEBVISOR_REQUIRE_ALL:-}" = 1 ]; then
    echo "== tests (DEBVISOR_REQUIRE_ALL=1: a skip for a missing prerequisite is a failure)"
else
    echo "== tests"
fi
cargo test --workspace --no-fail-fast -- --test-threads 4
