#!/bin/sh
# Installs what the benchmarks run besides our own code, only when missing (idempotent):
#   nginx (Debian package nginx-light) - bench/gate.py: a keep-alive, unbuffered reverse proxy, the reference hop
#   haproxy (Debian package haproxy)   - bench/fleet.py: the load balancer in front of the three nodes
#                                        (active health checks, runtime API on a stats socket)
# Only the binaries are used: each bench runs them with its own configuration in a temporary directory.
# Without apt (or without root) it says so and exits 0: bench/gate.py --no-nginx still runs, and
# bench/fleet.py says how to get haproxy.
set -eu

missing=""
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx-light"
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing="$missing haproxy"

if [ -z "$missing" ]; then
    echo "setup-bench-tools: nginx and haproxy are present"
    exit 0
fi

# The packages' own services are not wanted: policy-rc.d keeps them from starting where invoke-rc.d is
# used, and without systemd as PID 1 nothing starts them anyway.
# shellcheck source=tools/apt-install.sh
. "$(dirname "$0")/apt-install.sh"
# shellcheck disable=SC2086 # $missing is a list of package names, split on purpose
apt_install setup-bench-tools "bench/gate.py --no-nginx runs without nginx; bench/fleet.py needs haproxy" $missing
