#!/usr/bin/env bash
# debvisorctl for the developer node of scripts/dev-run.sh: runs it inside the node's network
# namespace (its etcd listens on that namespace's loopback) with the developer configuration.
#
#   scripts/dev-ctl.sh status
#   scripts/dev-ctl.sh network add 100 --type managed --ipv4 10.1.0.0/24 …
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
NETNS="${DEBVISOR_DEV_NETNS:-debvisor-dev}"
# Not a configuration override: the daemon would refuse an unknown DEBVISOR_* variable.
unset DEBVISOR_DEV_NETNS
if [[ ! -e "/run/netns/$NETNS" ]]; then
  echo "dev-ctl.sh: network namespace $NETNS does not exist: start the node with scripts/dev-run.sh" >&2
  exit 1
fi
exec ip netns exec "$NETNS" "$repo/target/debug/debvisorctl" \
  --config "$repo/etc/debvisor/debvisord.dev.yaml" "$@"
