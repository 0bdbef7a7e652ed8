#!/usr/bin/env bash
# Build the Sandstorm container image with podman, without needing a container registry: the
# Debian base image is made locally with mmdebstrap and imported as localhost/debian:bookworm.
#
#   scripts/build-container.sh [--tag TAG] [--base IMAGE]
#
# --base uses an existing base image instead (e.g. docker.io/library/debian:bookworm).
# Run the result with:
#   podman run --privileged -p 127.0.0.1:3000:3000 -v sandstorm-data:/var/lib/sandstorm TAG
# (add the same --runtime/--ulimit flags this script prints when it needed them to build).
set -euo pipefail

tag=localhost/sandstorm:latest
base=""
while (($#)); do
    case "$1" in
        --tag) tag="$2"; shift 2 ;;
        --base) base="$2"; shift 2 ;;
        -h | --help) sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "build-container.sh: unknown option: $1" >&2; exit 2 ;;
    esac
done

if [[ $EUID -ne 0 ]]; then
    exec sudo bash "$0" "$@"
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
say() { printf '==> %s\n' "$*"; }

need=(podman mmdebstrap)
# crun (podman's default runtime) refuses hosts with hybrid cgroups; runc works there.
[[ -f /sys/fs/cgroup/cgroup.controllers ]] || need+=(runc)
missing=()
for pkg in "${need[@]}"; do
    command -v "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

if [[ -z "$base" ]]; then
    base=localhost/debian:bookworm
    if ! podman image exists "$base"; then
        mirror="http://deb.debian.org/debian"
        if [[ -x .venv/bin/python ]]; then
            mirror="$(.venv/bin/python -c \
                'from sandstorm.images import find_apt_mirror; print(find_apt_mirror())')"
        fi
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        say "making $base with mmdebstrap from $mirror"
        mmdebstrap --quiet --variant=apt bookworm "$tmp/base.tar" "$mirror"
        podman import --quiet "$tmp/base.tar" "$base" >/dev/null
    fi
fi

flags=()
if [[ ! -f /sys/fs/cgroup/cgroup.controllers ]]; then
    flags+=(--runtime runc)
fi
# Without CAP_SYS_RESOURCE (common inside VMs and containers) the runtime cannot raise rlimits
# to podman's defaults; ask for limits the host already allows.
cap_eff="$(awk '/^CapEff:/ {print $2}' /proc/self/status)"
if ((((0x$cap_eff >> 24) & 1) == 0)); then  # bit 24 is CAP_SYS_RESOURCE
    flags+=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
fi
# Let pip trust the host's CA bundle (a TLS-intercepting proxy's CA, say) during the build only.
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    flags+=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro
        --build-arg HOST_CA=/run/host-ca.crt)
fi

say "podman build ${flags[*]} --build-arg BASE=$base -t $tag"
podman build "${flags[@]}" --build-arg "BASE=$base" -f Containerfile -t "$tag" .
say "built $tag"
