#!/usr/bin/env bash
# Install what is needed, build, and run debvisord on the embedded developer default
# (etc/debvisor/debvisord.dev.yaml: private etcd on 127.0.0.1:23790, libvirt test:///default,
# no host networking, no sysctl, no firewall — the machine's network is left untouched).
# Prints `debvisorctl status` once the node is in `run`; the daemon keeps running.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cargo build --bins
CFG=etc/debvisor/debvisord.dev.yaml
mkdir -p .dev-state
./target/debug/debvisord --config "$CFG" >>.dev-state/debvisord.log 2>&1 &
pid=$!
echo "debvisord started (pid $pid), log: .dev-state/debvisord.log"
for _ in $(seq 1 600); do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "debvisord exited; last log lines:" >&2; tail -n 30 .dev-state/debvisord.log >&2; exit 1
  fi
  if ./target/debug/debvisorctl --config "$CFG" status -o json 2>/dev/null | grep -q '"daemon_state":"run"'; then
    ./target/debug/debvisorctl --config "$CFG" status
    echo "stop it with: kill $pid"
    exit 0
  fi
  sleep 0.1
done
echo "debvisord did not reach run within 60 s; log: .dev-state/debvisord.log" >&2
exit 1
