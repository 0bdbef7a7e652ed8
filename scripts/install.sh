#!/usr/bin/env bash
# Set up Sandstorm on a Debian/Ubuntu machine: system packages, the Python environment, the
# default sandbox image and its VM guest (for the qemu runtime). Idempotent: a second run checks
# everything and changes nothing.
#
#   scripts/install.sh [--no-image] [serve [ARGS…] | test [PYTEST ARGS…]]
#
# With "serve" it then starts the gateway on http://localhost:3000; with "test" it runs the
# linters, the type checker and the whole test suite.
#
# Environment: SANDSTORM_DATA_DIR (default /var/lib/sandstorm) is where the image is built.
# Must run as root (it re-executes itself with sudo when it is not).
set -euo pipefail

usage() {
    sed -n '2,9s/^# \{0,1\}//p' "$0"
}

build_image=1
mode=install
original_args=("$@")
while (($#)); do
    case "$1" in
        --no-image) build_image=0; shift ;;
        -h | --help) usage; exit 0 ;;
        serve | test) mode="$1"; shift; break ;;
        *) echo "install.sh: unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
done
set -- "${original_args[@]}"

if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo --preserve-env=SANDSTORM_DATA_DIR,PIP_INDEX_URL,http_proxy,https_proxy,CI \
            bash "$0" "$@"
    fi
    echo "install.sh: must run as root (and sudo is not available)" >&2
    exit 1
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
data_dir="${SANDSTORM_DATA_DIR:-/var/lib/sandstorm}"
say() { printf '==> %s\n' "$*"; }

# --- system packages --------------------------------------------------------------------------
# debian-archive-keyring lets mmdebstrap verify Debian's archive on Ubuntu hosts too.
# gcc and libc6-dev compile the per-sandbox shim and the in-sandbox agent (sandstorm/shim/shim.c,
# sandstorm/agent/src/*.c, linked statically with libc6-dev's libc.a, at gateway start) and
# the image's statx shim (sandstorm/images/statx_shim.c).
# qemu-system-x86 runs the VM tier (the qemu runtime, isolation strong/maximum); e2fsprogs makes
# the guest's ext4 root. The guest kernel is Debian's linux-image-amd64, fetched by the image
# build with apt-get download (not installed on the host); gcc builds the guest's static init.
packages=(python3 python3-venv python3-pip mmdebstrap ca-certificates curl
    debian-archive-keyring gcc libc6-dev qemu-system-x86 e2fsprogs)
# The web console's browser tests drive Debian's Chromium: only the test set-up needs it.
if [[ "$mode" == test ]]; then
    packages+=(chromium fonts-dejavu-core)
    # The kata driver's tests start their own containerd (Debian's, with runc) and drive the
    # same path as Kata with runtime type io.containerd.runc.v2. Serving does not need it.
    packages+=(containerd runc)
fi
missing=()
for pkg in "${packages[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

lists_fresh() {
    # Any Packages index younger than a day counts as fresh.
    find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | grep -q .
}

if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    if ! lists_fresh; then
        say "apt-get update (package lists are missing or older than a day)"
        apt-get update -qq
    fi
    say "installing ${missing[*]}"
    # containerd's package would start (and enable) the host's daemon; the tests run their own.
    # policy-rc.d tells the package scripts not to start services while this install runs.
    policy_added=0
    if [[ " ${missing[*]} " == *" containerd "* && ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_added=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        # Fresh-looking lists can still be stale for a package that moved; retry once.
        say "install failed; apt-get update and retrying"
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if [[ " ${missing[*]} " == *" containerd "* ]]; then
        if ((policy_added)); then
            rm -f /usr/sbin/policy-rc.d
            trap - EXIT
        fi
        # Installed here for the tests only: not enabled at boot either.
        if command -v deb-systemd-helper >/dev/null 2>&1; then
            deb-systemd-helper disable containerd.service >/dev/null 2>&1 || true
        fi
    fi
else
    say "system packages already installed"
fi

# --- gVisor -----------------------------------------------------------------------------------
# runsc 0.0~20240729 or newer: bookworm's own runsc (0.0~20221219) starts processes slower on the
# ptrace platform, has no systrap platform, and rejects statx(AT_NO_AUTOMOUNT) (the image's
# statx shim works around that one). On bookworm it comes from Debian's bookworm-backports (added
# as an apt source here; backports are never preferred for any other package); newer Debian
# releases have it in main.
min_runsc="0.0~20240729"
runsc_version="$(dpkg-query -W -f='${Version}' runsc 2>/dev/null || true)"
if [[ -z "$runsc_version" ]] || dpkg --compare-versions "$runsc_version" lt "$min_runsc"; then
    export DEBIAN_FRONTEND=noninteractive
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    from=()
    if [[ "$codename" == bookworm ]]; then
        if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            say "adding Debian's bookworm-backports as an apt source (for runsc)"
            printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" \
                "Suites: bookworm-backports" "Components: main" \
                "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" \
                >/etc/apt/sources.list.d/sandstorm-backports.sources
        fi
        from=(-t bookworm-backports)
    fi
    say "apt-get update, installing runsc >= $min_runsc"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${from[@]}" runsc >/dev/null
    runsc_version="$(dpkg-query -W -f='${Version}' runsc)"
    if dpkg --compare-versions "$runsc_version" lt "$min_runsc"; then
        echo "install.sh: runsc $runsc_version is older than $min_runsc" >&2
        exit 1
    fi
fi

# --- host process numbers ---------------------------------------------------------------------
# Each gVisor sandbox may take up to pids_limit x 24 host tasks (docs/security.md): the kernel's
# 32768-pid default would let a few fork bombs leave the gateway no pid to start a thread with.
# 4194304 is the kernel's maximum on 64-bit (systemd's default too). Kept across reboots.
want_pid_max=4194304
if (($(cat /proc/sys/kernel/pid_max) < want_pid_max)); then
    if { echo "$want_pid_max" >/proc/sys/kernel/pid_max; } 2>/dev/null; then
        say "kernel.pid_max raised to $want_pid_max"
        mkdir -p /etc/sysctl.d
        echo "kernel.pid_max = $want_pid_max" >/etc/sysctl.d/60-sandstorm.conf
    else
        say "warning: cannot raise kernel.pid_max (read-only here); fork bombs share the host's pids"
    fi
fi

# --- Python environment -----------------------------------------------------------------------
if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv"
    python3 -m venv .venv
fi
say "pip install -e '.[dev]'"
# The build backend is chatty even with --quiet; show its output only when the install fails.
pip_log="$(mktemp)"
if ! .venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]' >"$pip_log" 2>&1; then
    cat "$pip_log" >&2
    rm -f "$pip_log"
    echo "install.sh: pip install failed" >&2
    exit 1
fi
rm -f "$pip_log"

# --- default sandbox image --------------------------------------------------------------------
if ((build_image)); then
    say "default sandbox image in $data_dir (built once with mmdebstrap, ~30 s, ~300 MB)"
    .venv/bin/sandstorm image build --data-dir "$data_dir"
    # The VM guest (Debian kernel, initramfs, ext4 root) for the qemu runtime.
    # apt-get download needs package lists that know the kernel package.
    if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
        say "apt-get update (the package lists do not know linux-image-amd64)"
        apt-get update -qq
    fi
    say "VM guest image in $data_dir (built once from Debian packages)"
    .venv/bin/sandstorm image build --vm --data-dir "$data_dir"
else
    say "skipping the sandbox image (--no-image)"
fi
say "done"

# --- what to do next ------------------------------------------------------------------------
# Drop everything up to and including the mode word; the rest goes to the command.
while (($#)) && [[ "$1" != "$mode" ]]; do shift; done
(($#)) && shift
case "$mode" in
    serve)
        say "starting the gateway on http://localhost:3000 (Ctrl-C stops it and its sandboxes)"
        exec .venv/bin/sandstorm serve --data-dir "$data_dir" "$@"
        ;;
    test)
        say "ruff, mypy, pytest"
        .venv/bin/ruff check .
        .venv/bin/ruff format --check .
        .venv/bin/mypy
        SANDSTORM_TEST_DATA_DIR="$data_dir" exec .venv/bin/pytest "$@"
        ;;
esac
