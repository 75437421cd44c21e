#!/bin/sh
# Installs spotguard on a VM image (run by Packer, or by hand on a running VM):
#   ROOT/opt/spotguard/venv                                 its own virtualenv (no system site-packages)
#   ROOT/etc/spotguard/spotguard.toml                       the given config, or a commented default
#   ROOT/etc/systemd/system/spotguard.service               the unit
#   ROOT/etc/systemd/system/spotguard.service.d/10-inference.conf   ordering after the engine's unit
#   ROOT/etc/systemd/system/spotguard-gate.service (+ .d/10-inference.conf)  the gate, its own unit so it
#                                                           outlives restarts of spotguard.service
# and, only when ROOT is / and systemd is running, `systemctl daemon-reload` and `enable`.
#
# Python: spotguard needs 3.11 or newer with venv. Without --python it uses the first of python3,
# python3.13, python3.12, python3.11 that qualifies; when none does and it installs into / on a system with
# apt (the GPU images of the Packer template run Ubuntu 22.04, whose python3 is 3.10), it installs the
# newest python3.X and python3.X-venv (X >= 11) the distribution has, e.g. python3.11 on Ubuntu 22.04;
# otherwise, or with --no-install-python, it stops and says what to install.
#
# pip resolves dependencies from the configured index (PyPI by default; pass --pip-arg to point it
# at a mirror or a local wheelhouse, e.g. --pip-arg --no-index --pip-arg --find-links=/srv/wheels).
#
# A ROOT other than / stages the tree for a machine where it will live at / (an image, a container):
# the virtualenv's scripts are rewritten to name /opt/spotguard/venv. Run them in the staging tree
# as ROOT/opt/spotguard/venv/bin/python ROOT/opt/spotguard/venv/bin/spotguard.
set -eu

usage() {
    cat <<'EOF'
usage: install-spotguard.sh (--wheel PATH | --version X) [options]
  --wheel PATH            install this spotguard wheel (local file)
  --version X             install spotguard==X from the package index
  --extras LIST           pip extras, e.g. aws (boto3 for ELBv2 and ASG hooks)
  --inference-unit NAME   systemd unit of the inference server (e.g. vllm.service); spotguard is
                          ordered after it so it is stopped, and drains, first at shutdown
  --config FILE           install this file as /etc/spotguard/spotguard.toml (default: keep an
                          existing one, else write a commented default)
  --root DIR, --destdir DIR, --prefix DIR
                          install under DIR instead of / (no systemctl calls then)
  --python PATH           Python 3.11+ (with venv) used to create the virtualenv (default: the first
                          of python3, python3.13, python3.12, python3.11 that is one)
  --no-install-python     never install a Python from the distribution; fail instead
  --pip-arg ARG           extra argument for pip install (repeatable)
  --systemd-dir DIR       where spotguard.service and spotguard.service.d/ are (default: next to
                          this script, or ../../systemd in a source checkout)
  --no-enable             do not run systemctl daemon-reload / enable
EOF
}

die() {
    echo "install-spotguard: $*" >&2
    exit 2
}

absolute() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

need_arg() {
    [ "$#" -ge 2 ] || die "$1 needs a value (see --help)"
}

wheel=""
version=""
extras=""
inference_unit=""
config=""
root="/"
python=""
install_python=1
systemd_dir=""
enable=1
pip_args=""

while [ "$#" -gt 0 ]; do
    case "$1" in
        --wheel) need_arg "$@"; wheel=$2; shift 2 ;;
        --version) need_arg "$@"; version=$2; shift 2 ;;
        --extras) need_arg "$@"; extras=$2; shift 2 ;;
        --inference-unit) need_arg "$@"; inference_unit=$2; shift 2 ;;
        --config) need_arg "$@"; config=$2; shift 2 ;;
        --root | --destdir | --prefix) need_arg "$@"; root=$2; shift 2 ;;
        --python) need_arg "$@"; python=$2; shift 2 ;;
        --pip-arg) need_arg "$@"; pip_args="$pip_args
$2"; shift 2 ;;
        --systemd-dir) need_arg "$@"; systemd_dir=$2; shift 2 ;;
        --no-enable) enable=0; shift ;;
        --no-install-python) install_python=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

# --- check the inputs before touching anything -------------------------------------------------
if [ -n "$wheel" ] && [ -n "$version" ]; then
    die "give --wheel or --version, not both"
fi
if [ -z "$wheel" ] && [ -z "$version" ]; then
    die "give --wheel PATH or --version X"
fi
if [ -n "$wheel" ] && [ ! -f "$wheel" ]; then
    die "--wheel $wheel: no such file"
fi
case "$extras" in
    *[!A-Za-z0-9,_-]*) die "--extras $extras: expected a comma-separated list like aws" ;;
esac
if [ -n "$config" ] && [ ! -f "$config" ]; then
    die "--config $config: no such file"
fi
if [ -n "$inference_unit" ]; then
    case "$inference_unit" in
        *[!A-Za-z0-9:_.@-]*) die "--inference-unit $inference_unit: not a systemd unit name" ;;
        *.service | *.target | *.scope) ;;
        *) inference_unit="$inference_unit.service" ;;
    esac
fi

script_dir=$(cd "$(dirname "$0")" && pwd)
if [ -z "$systemd_dir" ]; then
    for candidate in "$script_dir/systemd" "$script_dir/../../systemd"; do
        if [ -f "$candidate/spotguard.service" ]; then
            systemd_dir=$candidate
            break
        fi
    done
fi
if [ -z "$systemd_dir" ] || [ ! -f "$systemd_dir/spotguard.service" ]; then
    die "spotguard.service not found; pass --systemd-dir"
fi

# --- a Python 3.11+ with venv --------------------------------------------------------------------
# Debian and Ubuntu ship venv (ensurepip) in a separate pythonX.Y-venv package, so check for it too.
python_ok() {
    "$1" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

find_python() {
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# Installs the newest python3.X (X >= 11) with its venv package that apt can find; prints its name.
apt_python() {
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || return 1
    for minor in 13 12 11; do
        if apt-cache show "python3.$minor-venv" >/dev/null 2>&1; then
            echo "install-spotguard: installing python3.$minor and python3.$minor-venv from the distribution" >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                "python3.$minor" "python3.$minor-venv" >&2 || return 1
            echo "python3.$minor"
            return 0
        fi
    done
    return 1
}

describe_python() {
    "$1" -c 'import sys; print("Python %d.%d.%d" % sys.version_info[:3])' 2>/dev/null || echo "not runnable"
}

if [ -n "$python" ]; then
    python_ok "$python" || die "--python $python ($(describe_python "$python")): Python 3.11 or newer with venv is needed"
elif found=$(find_python); then
    python=$found
else
    seen="python3: $(command -v python3 >/dev/null 2>&1 && describe_python python3 || echo "not installed")"
    if [ "$install_python" -eq 0 ]; then
        die "no Python 3.11+ with venv ($seen) and --no-install-python; install one and pass --python"
    fi
    case "${root:-/}" in
        /) ;;
        *) die "no Python 3.11+ with venv ($seen); installing into $root, so not installing one here: pass --python" ;;
    esac
    if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" -ne 0 ]; then
        die "no Python 3.11+ with venv ($seen) and no apt-get as root to install one; install Python 3.11+ and venv, then pass --python"
    fi
    if ! python=$(apt_python) || ! python_ok "$python"; then
        die "no Python 3.11+ with venv ($seen), and the distribution's package lists have no python3.11, 3.12 or 3.13 with venv: use an image with Python 3.11+ (e.g. Ubuntu 24.04) or install one and pass --python"
    fi
fi
echo "install-spotguard: using $(describe_python "$python") at $(command -v "$python" || echo "$python")"

# Python puts the working directory on sys.path, so run pip and the checks from / : in a source
# checkout pip would otherwise see ./spotguard.egg-info and consider spotguard already installed.
[ -z "$wheel" ] || wheel=$(absolute "$wheel")
[ -z "$config" ] || config=$(absolute "$config")
systemd_dir=$(absolute "$systemd_dir")
root=$(absolute "$root")
case "$python" in */*) python=$(absolute "$python") ;; esac
root=${root%/}
cd /
venv="$root/opt/spotguard/venv"
etc="$root/etc/spotguard"
units="$root/etc/systemd/system"

# --- the virtualenv -------------------------------------------------------------------------------
echo "install-spotguard: virtualenv $venv"
mkdir -p "$root/opt/spotguard"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# Extras go after a wheel's path (x.whl[aws]) but before a version (spotguard[aws]==1.0).
if [ -n "$wheel" ]; then
    spec="$wheel${extras:+[$extras]}"
else
    spec="spotguard${extras:+[$extras]}==$version"
fi
# pip_args holds one argument per line: split on newlines only, so an argument keeps its spaces.
old_ifs=$IFS
IFS='
'
if [ -n "$wheel" ]; then
    # A rebuilt wheel often keeps its version number: replace spotguard itself unconditionally
    # (its dependencies are left to the normal install below, which keeps what is already there).
    # shellcheck disable=SC2086 # split on purpose (IFS is a newline here)
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall \
        $pip_args "$wheel"
fi
# shellcheck disable=SC2086 # split on purpose (IFS is a newline here)
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check $pip_args "$spec"
IFS=$old_ifs
"$venv/bin/python" -c 'import spotguard' || die "spotguard does not import from $venv"
if [ -n "$root" ]; then
    # The tree is staged for a machine where it lives at /: scripts must name /opt/..., not ROOT/opt/...
    # (symlinks such as bin/python are left alone; sed -i would turn them into copies).
    for file in "$venv"/bin/*; do
        if [ -f "$file" ] && [ ! -L "$file" ] && grep -qI "$venv" "$file"; then
            sed -i "s|$venv|/opt/spotguard/venv|g" "$file"
        fi
    done
fi

# --- configuration ----------------------------------------------------------------------------------
mkdir -p "$etc"
chmod 0755 "$etc"
if [ -n "$config" ]; then
    install -m 0640 "$config" "$etc/spotguard.toml"
    echo "install-spotguard: installed $config as $etc/spotguard.toml"
elif [ -f "$etc/spotguard.toml" ]; then
    echo "install-spotguard: kept the existing $etc/spotguard.toml"
else
    # The default is written from the installed package's own reference, so it always lists the
    # keys this version knows; everything is commented out except the engine's unit.
    "$venv/bin/python" - "$inference_unit" >"$etc/spotguard.toml.tmp" <<'PY'
import json, sys
from spotguard import config

print("# spotguard configuration. Every key is shown with its default, commented out.")
print("# Reference: docs/operations.md. Each key can also be set as SPOTGUARD_<SECTION>_<KEY>.")
section = None
for name, key, kind, default, help_text in config.reference():
    if name != section:
        print(f"\n[{name}]")
        section = name
    print(f"# {help_text} ({kind})")
    if name == "server" and key == "unit" and sys.argv[1]:
        print(f"{key} = {json.dumps(sys.argv[1])}")
    else:
        print(f"# {key} = {default}")
PY
    chmod 0640 "$etc/spotguard.toml.tmp"
    mv "$etc/spotguard.toml.tmp" "$etc/spotguard.toml"
    echo "install-spotguard: wrote a commented default $etc/spotguard.toml"
fi
"$venv/bin/python" -c 'import sys; from spotguard import config; config.load(sys.argv[1], environ={})' \
    "$etc/spotguard.toml" || die "$etc/spotguard.toml is not a valid spotguard configuration"

# --- systemd units --------------------------------------------------------------------------------
mkdir -p "$units/spotguard.service.d" "$units/spotguard-gate.service.d"
install -m 0644 "$systemd_dir/spotguard.service" "$units/spotguard.service"
install -m 0644 "$systemd_dir/spotguard-gate.service" "$units/spotguard-gate.service"
if [ -n "$inference_unit" ]; then
    # The example drop-ins name vllm.service; their comments explain the ordering.
    for unit in spotguard spotguard-gate; do
        sed "s/vllm\\.service/$inference_unit/g" "$systemd_dir/$unit.service.d/10-inference.conf" \
            >"$units/$unit.service.d/10-inference.conf"
        chmod 0644 "$units/$unit.service.d/10-inference.conf"
    done
    echo "install-spotguard: spotguard and its gate are ordered after $inference_unit (stopped before it)"
else
    echo "install-spotguard: no --inference-unit; shutdown ordering against the engine is not set" >&2
fi

if [ "$enable" -eq 1 ] && [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    systemctl enable spotguard.service spotguard-gate.service
    echo "install-spotguard: enabled spotguard.service and spotguard-gate.service (start on next boot or systemctl start)"
else
    echo "install-spotguard: systemctl not run (root ${root:-/}, --no-enable or systemd not running)"
fi
