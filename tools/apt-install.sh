#!/bin/sh
# Shared by the tool scripts: apt_install WHO HINT PACKAGE...
# Installs PACKAGE... with apt-get (as root, or through passwordless sudo). Where that is impossible
# (no apt-get, not root, apt-get failing) it says so on stderr, with HINT as what to do instead, and
# returns 0: the tests or benches that need the packages skip or fall back rather than fail the build.

apt_install() {
    who=$1
    hint=$2
    shift 2
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$who: apt-get not found; install $* by hand ($hint)" >&2
        return 0
    fi
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo -n"
        else
            echo "$who: not root and no passwordless sudo; install $* by hand ($hint)" >&2
            return 0
        fi
    fi
    echo "$who: installing $*"
    if ! { $sudo apt-get update -q >/dev/null &&
           DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "$@"; }; then
        echo "$who: apt-get failed; install $* by hand ($hint)" >&2
    fi
    return 0
}
