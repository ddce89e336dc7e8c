#!/usr/bin/env bash
# Install the Debian packages debvisord and its tests need (idempotent; Debian 12, root).
set -euo pipefail
PKGS=(etcd-server etcd-client protobuf-compiler libprotobuf-dev pkg-config libvirt-dev libvirt-daemon-system
      libvirt-clients qemu-system-x86 nftables iproute2 ipmitool openssl dnsmasq-base busybox
      procps
      # the cluster tests' fake BMCs (ipmi_sim)
      openipmi
      # packaging and its tests: Debian tooling, man pages from --help, lintian, a systemd
      # container (debootstrap + systemd-nspawn), Python venvs for ansible-core/ansible-lint
      debhelper dpkg-dev help2man lintian debootstrap systemd-container python3-venv
      # a one-host Ceph for the storage tests, qemu's rbd block driver
      ceph-mon ceph-osd ceph-mgr ceph-common qemu-block-extra)
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
if [[ -c /dev/kvm ]] && getent group kvm >/dev/null && [[ "$(stat -c %G /dev/kvm)" != kvm ]]; then
  echo "deps: /dev/kvm → group kvm, mode 0660 (what udev does on a booted Debian)"
  chgrp kvm /dev/kvm
  chmod 0660 /dev/kvm
fi
if ! command -v cargo >/dev/null; then
  echo "deps: cargo not found: install a Rust toolchain (rustup, Rust >= 1.85) first" >&2
  exit 1
fi
