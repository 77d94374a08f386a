#!/usr/bin/env bash
# docker/base-image.sh NAME: a Debian bookworm image with Python 3.11, pip, venv, curl, tini and the CA
# certificates, made with debootstrap from a Debian mirror and imported as NAME. A stand-in for python:3.11-slim
# (the Dockerfile's PYTHON_IMAGE) where no image registry can be reached. Kept in the engine: when NAME exists,
# nothing is done.
#
# The mirror: $DEBIAN_MIRROR, else the first one of this machine's apt sources that serves bookworm, else
# deb.debian.org.
set -euo pipefail
NAME=${1:?usage: $0 IMAGE_NAME}
SUITE=bookworm
PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,curl,tini

if docker image inspect "$NAME" >/dev/null 2>&1; then
    echo "base image $NAME: cached"
    exit 0
fi

mirrors() {
    [ -n "${DEBIAN_MIRROR:-}" ] && echo "$DEBIAN_MIRROR"
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; break } }'
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '$1 == "URIs:" { for (i = 2; i <= NF; i++) print $i }'
    echo http://deb.debian.org/debian
}

mirror=""
for candidate in $(mirrors); do
    if curl -fsI --max-time 15 "${candidate%/}/dists/$SUITE/Release" >/dev/null 2>&1; then
        mirror=${candidate%/}
        break
    fi
done
[ -n "$mirror" ] || { echo "no Debian mirror serving $SUITE answers" >&2; exit 1; }

if ! command -v debootstrap >/dev/null; then
    { timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq debootstrap
    } >/dev/null 2>&1 || { echo "apt-get install debootstrap failed" >&2; exit 1; }
fi

root=$(mktemp -d /var/tmp/sensorhub-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
start=$SECONDS
echo "base image $NAME: debootstrap $SUITE from $mirror ..."
if ! timeout 1200 debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror" >"$root.log" 2>&1; then
    tail -20 "$root.log" >&2
    rm -f "$root.log"
    exit 1
fi
rm -f "$root.log"
# what an image does not need: downloaded packages, package lists, this machine's resolver and host name
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/* "$root"/var/log/*.log
: >"$root/etc/resolv.conf"
: >"$root/etc/hostname"
tar -C "$root" --numeric-owner -c . \
    | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase $SUITE with $PACKAGES" - "$NAME" >/dev/null
echo "base image $NAME: made in $((SECONDS - start))s"
