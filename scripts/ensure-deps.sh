#!/usr/bin/env bash
# Makes sure the system packages Ferry needs are present: installs them with
# apt-get when run as root on Debian, or stops with one line naming them.
#   scripts/ensure-deps.sh build   what building needs
#   scripts/ensure-deps.sh test    that, plus what the tests drive (curl)
set -euo pipefail
what=${1:-build}

if ! command -v cargo >/dev/null 2>&1; then
  echo "ferry: Rust is not installed (no cargo on PATH); install it with rustup and run this again" >&2
  exit 1
fi

have_libclang() {
  [ -n "${LIBCLANG_PATH:-}" ] && return 0
  ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' && return 0
  # libclang itself, not libclang-cpp (which some machines carry alone).
  local f
  for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so*; do
    [ -e "$f" ] && return 0
  done
  return 1
}

need=()
command -v cc >/dev/null 2>&1 || need+=(gcc)          # ring builds C and assembly
command -v c++ >/dev/null 2>&1 || need+=(g++)         # RocksDB is C++
have_libclang || need+=(clang libclang-dev)           # RocksDB's bindings (bindgen)
if [ "$what" = test ]; then
  command -v curl >/dev/null 2>&1 || need+=(curl)     # tests use the real curl as a SOCKS5 client
  command -v prometheus >/dev/null 2>&1 || need+=(prometheus)  # a real Prometheus scrapes a test mesh
fi
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "ferry: installing ${need[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "ferry: missing build packages: ${need[*]} (on Debian: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
