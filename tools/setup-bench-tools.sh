#!/bin/sh
# Installs what bench/gate.py compares the gate against, only when missing (idempotent):
#   nginx (Debian package nginx-light) - a keep-alive, unbuffered reverse proxy, the reference hop
# Only the binary is used: bench/gate.py runs it with its own configuration in a temporary directory.
# Without apt (or without root) it says so and exits 0: bench/gate.py --no-nginx still runs.
set -eu

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    echo "setup-bench-tools: nginx is present"
    exit 0
fi

# The package's own service is not wanted: policy-rc.d keeps it from starting where invoke-rc.d is used,
# and without systemd as PID 1 nothing starts it anyway.
# shellcheck source=tools/apt-install.sh
. "$(dirname "$0")/apt-install.sh"
apt_install setup-bench-tools "or run bench/gate.py --no-nginx" nginx-light
