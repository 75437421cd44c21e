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

# Installing the systemd package inside a container does not start or replace any running init; it
# only provides the binaries (systemd-analyze) and the stock unit files verify resolves against.
# shellcheck source=tools/apt-install.sh
. "$(dirname "$0")/apt-install.sh"
# shellcheck disable=SC2086 # $missing is a list of package names, split on purpose
apt_install setup-test-tools "related tests will skip" $missing
