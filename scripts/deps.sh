#!/usr/bin/env bash
# Install the Debian packages debvisord needs (idempotent; Debian 12, root).
#
#   scripts/deps.sh          what the README's "Run it" needs: build the workspace and run the
#                            developer node (scripts/dev-run.sh)
#   scripts/deps.sh --test   that plus what the test suite needs (scripts/test.sh): libvirtd
#                            and qemu, Ceph, packaging tools, a systemd container, …
#
# The Rust toolchain is checked first, before anything is installed.
set -euo pipefail

MIN_RUST=1.85
test_suite=0
case "${1:-}" in
  "") ;;
  --test) test_suite=1 ;;
  *) echo "deps.sh: unknown argument $1 (only --test)" >&2; exit 2 ;;
esac

# Debian 12's rustc is too old for the dependencies: a rustup toolchain is needed.
if ! command -v cargo >/dev/null || ! command -v rustc >/dev/null; then
  echo "deps: cargo not found: install a Rust toolchain first (https://rustup.rs, Rust >= $MIN_RUST)" >&2
  exit 1
fi
rust_version="$(rustc --version | awk '{print $2}')"
if ! printf '%s\n%s\n' "$MIN_RUST" "${rust_version%%-*}" | sort -V -C; then
  echo "deps: rustc $rust_version is too old: Rust >= $MIN_RUST is needed (rustup update)" >&2
  exit 1
fi

# The developer node: build (protobuf for etcd's API, libvirt bindings) and run it — its
# private etcd, nft and ip for the node's network namespace, dnsmasq for managed networks.
PKGS=(etcd-server protobuf-compiler libprotobuf-dev pkg-config libvirt-dev nftables iproute2
      dnsmasq-base)
if ((test_suite)); then
  PKGS+=(
    # a real libvirtd with KVM guests, etcdctl, helpers of the harness
    etcd-client libvirt-daemon-system libvirt-clients qemu-system-x86 ipmitool openssl
    busybox procps
    # the cluster tests' fake BMCs (ipmi_sim)
    openipmi
    # packaging and its tests: Debian tooling, man pages from --help, lintian, a systemd
    # container (debootstrap + systemd-nspawn), Python venvs for ansible-core/ansible-lint
    debhelper dpkg-dev help2man lintian debootstrap systemd-container python3-venv
    # a one-host Ceph for the storage tests, qemu's rbd block driver
    ceph-mon ceph-osd ceph-mgr ceph-common qemu-block-extra)
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Without udev (a container, a machine not booted by systemd) /dev/kvm stays root-only: give
# it the group and mode Debian's udev rules give it, so libvirt's qemu (user libvirt-qemu,
# group kvm) runs guests with KVM instead of falling back to TCG.
if ((test_suite)) && [[ -c /dev/kvm ]] && getent group kvm >/dev/null \
    && [[ "$(stat -c %G /dev/kvm)" != kvm ]]; then
  echo "deps: /dev/kvm → group kvm, mode 0660 (what udev does on a booted Debian)"
  chgrp kvm /dev/kvm
  chmod 0660 /dev/kvm
fi
