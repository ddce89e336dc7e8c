# Ansible connection plugin of the debvisor tests: runs a play's commands inside a
# systemd-nspawn container of the test harness (tests/src/nspawn.rs) through
# `nsenter -t <leader> -a`, so one controller on the host drives several containers that
# have no sshd. The containers' own network is left for what the play sets up (etcd, the
# daemon), as in a real cluster.
from __future__ import annotations

import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = """
name: nsenter
short_description: run commands inside a container through nsenter (debvisor tests)
description:
  - Runs every command in all namespaces of a container whose PID 1 is given on the host.
author: DebVisor developers
options:
  leader:
    description: Host PID of the container's PID 1.
    vars:
      - name: nsenter_leader
"""

ENV = ["/usr/bin/env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "LANG=C.UTF-8", "HOME=/root"]


class Connection(ConnectionBase):
    """Commands and files through nsenter into the container of PID `nsenter_leader`."""

    transport = "nsenter"
    has_pipelining = True

    def _prefix(self):
        leader = self.get_option("leader")
        if not leader:
            raise AnsibleConnectionFailure("nsenter: nsenter_leader is not set")
        return ["nsenter", "-t", str(leader), "-a", "--wdns=/", "--"] + ENV

    def _connect(self):
        self._connected = True
        return self

    def exec_command(self, cmd, in_data=None, sudoable=False):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        p = subprocess.run(self._prefix() + ["/bin/sh", "-c", cmd], input=in_data,
                           capture_output=True, check=False)
        return p.returncode, p.stdout, p.stderr

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        with open(in_path, "rb") as f:
            p = subprocess.run(self._prefix() + ["/bin/sh", "-c", 'cat > "$1"', "sh", out_path],
                               stdin=f, capture_output=True, check=False)
        if p.returncode != 0:
            raise AnsibleError(f"nsenter: writing {out_path}: {p.stderr!r}")

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        with open(out_path, "wb") as f:
            p = subprocess.run(self._prefix() + ["cat", in_path], stdout=f,
                               stderr=subprocess.PIPE, check=False)
        if p.returncode != 0:
            raise AnsibleError(f"nsenter: reading {in_path}: {p.stderr!r}")

    def close(self):
        self._connected = False
