#!/usr/bin/env bash
# Configure podman (Debian 12's 4.3) so that a plain `podman build` / `podman run` works on
# machines like ours: runc (crun fails on setrlimit with hybrid cgroups), cgroupfs (no systemd
# session), events in a file (no journald), overlay storage, and explicit ulimits (the
# defaults copy the host's, which runc refuses to raise inside the container).
# Writes a drop-in that podman reads after its own defaults; re-running changes nothing.
set -euo pipefail
dropin=/etc/containers/containers.conf.d/50-fashion-exp.conf
storage=/etc/containers/storage.conf
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
$sudo mkdir -p "$(dirname "$dropin")"
want='# Written by fashion_exp (scripts/devtools/podman_setup.sh): see docs/deploy.md.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"'
if [ "$(cat "$dropin" 2>/dev/null)" != "$want" ]; then
  printf '%s\n' "$want" | $sudo tee "$dropin" >/dev/null
fi
if [ ! -e "$storage" ]; then
  printf '%s\n' '# Written by fashion_exp (scripts/devtools/podman_setup.sh).' '[storage]' \
    'driver = "overlay"' 'runroot = "/run/containers/storage"' \
    'graphroot = "/var/lib/containers/storage"' | $sudo tee "$storage" >/dev/null
fi
