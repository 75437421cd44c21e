#!/bin/sh
# Installs the system tools the shipping tests use, only when missing (idempotent):
#   systemd-analyze (package systemd)        - tests/ship/test_unit.py verifies the unit file
#   ShellCheck (package shellcheck)          - tests/ship/test_shellcheck.py lints our shell scripts
#   systemd-nspawn (package systemd-container) - tests/ship/test_systemd_e2e.py boots systemd as PID 1
#   gcc                                      - tests/gpu builds a fake libnvidia-ml.so.1
#   debootstrap                              - tools/build-rootfs.sh: a Debian 11 root file system for
#                                              tests/ship/test_install_old_python.py
# Without apt (or without root) it says so and exits 0: the tests that need a missing tool skip
# with a reason instead of failing.
set -eu

missing=""
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
command -v shellcheck >/dev/null 2>&1 || missing="$missing shellcheck"
command -v systemd-nspawn >/dev/null 2>&1 || missing="$missing systemd-container"
command -v gcc >/dev/null 2>&1 || command -v cc >/dev/null 2>&1 || missing="$missing gcc libc6-dev"
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"

if [ -z "$missing" ]; then
    echo "setup-test-tools: systemd-analyze, shellcheck, systemd-nspawn, gcc and debootstrap are present"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-test-tools: apt-get not found; install$missing by hand (related tests will skip)" >&2
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo="sudo -n"
    else
        echo "setup-test-tools: not root and no passwordless sudo; install$missing by hand (related tests will skip)" >&2
        exit 0
    fi
fi

echo "setup-test-tools: installing$missing"
# Installing the systemd package inside a container does not start or replace any running init; it
# only provides the binaries (systemd-analyze) and the stock unit files verify resolves against.
# shellcheck disable=SC2086 # $missing is a list of package names, split on purpose
if ! { $sudo apt-get update -q >/dev/null &&
       DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends $missing; }; then
    echo "setup-test-tools: apt-get failed; install$missing by hand (related tests will skip)" >&2
fi
exit 0
