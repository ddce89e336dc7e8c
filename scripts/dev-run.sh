#!/usr/bin/env bash
# Install what is needed, build, and run debvisord on the developer default
# (etc/debvisor/debvisord.dev.yaml: private etcd on 127.0.0.1:23790, libvirt test:///default,
# firewall, sysctl and client networks) inside the network namespace `debvisor-dev`, created
# here if missing: the host's links, addresses, routes, nft ruleset and sockets are left as
# they are. Prints `debvisorctl status` once the node is in `run`; the daemon keeps running.
# Operate it with scripts/dev-ctl.sh (debvisorctl in the namespace).
#
#   scripts/dev-run.sh [--no-build]
#
# Environment: DEBVISOR_DEV_NETNS (namespace name, default debvisor-dev; passed on to the
# daemon as networking.require_netns), and any DEBVISOR_* override of the configuration
# (e.g. DEBVISOR_PATHS_STATE_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
build=1
case "${1:-}" in
  "") ;;
  --no-build) build=0 ;;
  *) echo "dev-run.sh: unknown argument $1 (only --no-build)" >&2; exit 2 ;;
esac
NETNS="${DEBVISOR_DEV_NETNS:-debvisor-dev}"
# Not a configuration override: the daemon would refuse an unknown DEBVISOR_* variable.
unset DEBVISOR_DEV_NETNS
export DEBVISOR_NETWORKING_REQUIRE_NETNS="$NETNS"
CFG=etc/debvisor/debvisord.dev.yaml
LOG=.dev-state/debvisord.log
if ((build)); then
  ./scripts/deps.sh
  cargo build --bins
fi
# The namespace holds everything the node does to "its host's" network; deleting it
# (ip netns del debvisor-dev) removes its bridges and VXLANs with it.
if [[ ! -e "/run/netns/$NETNS" ]]; then
  ip netns add "$NETNS"
  echo "network namespace $NETNS created (ip netns del $NETNS removes it and everything in it)"
fi
ip -n "$NETNS" link set lo up
mkdir -p .dev-state
logged_before=$(stat -c %s "$LOG" 2>/dev/null || echo 0)
# `ip netns exec` execs the daemon: $! is its PID.
ip netns exec "$NETNS" ./target/debug/debvisord --config "$CFG" >>"$LOG" 2>&1 &
pid=$!
echo "debvisord started (pid $pid) in network namespace $NETNS, log: $LOG"
ctl=(ip netns exec "$NETNS" ./target/debug/debvisorctl --config "$CFG")
for _ in $(seq 1 600); do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "debvisord exited; its last log lines:" >&2
    tail -c "+$((logged_before + 1))" "$LOG" | tail -n 30 >&2
    exit 1
  fi
  # In run, and held by this daemon (not by one already running there).
  json="$("${ctl[@]}" status -o json 2>/dev/null || true)"
  if [[ "$json" == *'"daemon_state":"run"'* && "$json" =~ \"pid\":$pid[,}] ]]; then
    "${ctl[@]}" status
    echo "operate it with: ./scripts/dev-ctl.sh status    stop it with: kill $pid"
    exit 0
  fi
  sleep 0.1
done
echo "debvisord did not reach run within 60 s; log: $LOG" >&2
exit 1
