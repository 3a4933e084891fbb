#!/usr/bin/env bash
# Makes a local Debian bookworm base image from Debian's packages with
# debootstrap, for the container test: no image registry can be reached
# here, so it stands in for debian:bookworm-slim (what the shipped
# Dockerfile's runtime stage starts from). Reused when it already exists.
#   scripts/container-base.sh [TAG]      default ferry-test-base:bookworm
# Prints the tag. Needs root, debootstrap and docker.
set -euo pipefail
tag=${1:-ferry-test-base:bookworm}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
command -v debootstrap >/dev/null 2>&1 || { echo "container-base: debootstrap is missing (scripts/ensure-deps.sh test installs it)" >&2; exit 1; }
# The Debian mirror apt already uses.
mirror=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}';
            grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}'; } |
          grep -v security | head -n 1 || true)
mirror=${mirror:-http://deb.debian.org/debian}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
echo "container-base: debootstrap bookworm (minbase) from the configured mirror, about a minute" >&2
if ! debootstrap --variant=minbase bookworm "$dir/root" "$mirror" >"$dir/log" 2>&1; then
  tail -n 20 "$dir/log" >&2
  exit 1
fi
rm -rf "$dir"/root/var/cache/apt/archives/*.deb "$dir"/root/var/lib/apt/lists/*
tar -C "$dir/root" -c . | docker import - "$tag" >/dev/null
echo "$tag"
