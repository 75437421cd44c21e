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

if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-bench-tools: apt-get not found; install nginx by hand (or run bench/gate.py --no-nginx)" >&2
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo="sudo -n"
    else
        echo "setup-bench-tools: not root and no passwordless sudo; install nginx-light by hand" >&2
        exit 0
    fi
fi

echo "setup-bench-tools: installing nginx-light"
# The package's own service is not wanted: policy-rc.d keeps it from starting where invoke-rc.d is used,
# and without systemd as PID 1 nothing starts it anyway.
if ! { $sudo apt-get update -q >/dev/null &&
       DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends nginx-light; }; then
    echo "setup-bench-tools: apt-get failed; install nginx-light by hand (or run bench/gate.py --no-nginx)" >&2
fi
exit 0
