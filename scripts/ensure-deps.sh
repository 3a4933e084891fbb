#!/usr/bin/env bash
# Makes sure the system packages Ferry needs are present: installs them with
# apt-get when run as root on Debian, or stops with one line naming them.
#   scripts/ensure-deps.sh build   what building needs
#   scripts/ensure-deps.sh test    that, plus what the tests drive: curl,
#                                  prometheus, debootstrap (the container
#                                  test's base image), Docker and Compose
#                                  (started if the daemon is not running), and
#                                  the Python packages that render and check
#                                  the Helm chart
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

python_deps() {
  # Helm's Go SDK (helm-python-sdk) renders and lints the chart offline;
  # kubernetes-validate holds the Kubernetes schemas.
  [ "$what" = test ] || return 0
  if ! command -v python3 >/dev/null 2>&1; then
    echo "ferry: the Helm chart test needs python3 (on Debian: apt-get install python3 python3-pip)" >&2
    exit 1
  fi
  python3 -c 'import helm_python, kubernetes_validate, yaml' 2>/dev/null && return 0
  echo "ferry: installing helm-python-sdk, kubernetes-validate and PyYAML with pip" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    'helm-python-sdk==0.2.2' 'kubernetes-validate==1.37.0' PyYAML ||
    { echo "ferry: could not install them: python3 -m pip install helm-python-sdk kubernetes-validate PyYAML" >&2; exit 1; }
}

docker_up() {
  # The container test drives the Docker engine: start it if it is not
  # answering (a machine whose daemon was stopped, or just installed).
  [ "$what" = test ] || return 0
  docker info >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "ferry: the Docker daemon is not running; the container test needs it (sudo service docker start)" >&2
    exit 1
  fi
  echo "ferry: starting the Docker daemon" >&2
  # A daemon still shutting down holds its pid file: let it finish; a pid
  # file whose process is gone would stop the new one.
  for _ in $(seq 1 30); do
    pgrep -x dockerd >/dev/null 2>&1 || break
    sleep 1
  done
  if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
  fi
  { command -v service && service docker start; } >/dev/null 2>&1 || true
  for i in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return 0
    if [ "$i" = 5 ] && ! pgrep -x dockerd >/dev/null 2>&1; then
      (nohup dockerd >/var/log/ferry-dockerd.log 2>&1 &)
    fi
    sleep 1
  done
  echo "ferry: the Docker daemon did not start (see /var/log/ferry-dockerd.log or the docker service's log)" >&2
  exit 1
}

need=()
command -v cc >/dev/null 2>&1 || need+=(gcc)          # ring builds C and assembly
command -v c++ >/dev/null 2>&1 || need+=(g++)         # RocksDB is C++
have_libclang || need+=(clang libclang-dev)           # RocksDB's bindings (bindgen)
if [ "$what" = test ]; then
  command -v curl >/dev/null 2>&1 || need+=(curl)     # tests use the real curl as a SOCKS5 client
  command -v prometheus >/dev/null 2>&1 || need+=(prometheus)  # a real Prometheus scrapes a test mesh
  command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap) # the container test's local base image
  command -v git >/dev/null 2>&1 || need+=(git)       # git clone through the HTTP CONNECT entry
  command -v openssl >/dev/null 2>&1 || need+=(openssl) # that test's HTTPS server certificate
  command -v docker >/dev/null 2>&1 || need+=(docker.io)       # the container test
  { docker compose version || command -v docker-compose; } >/dev/null 2>&1 || need+=(docker-compose)
fi
if [ ${#need[@]} -eq 0 ]; then
  python_deps
  docker_up
  exit 0
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "ferry: installing ${need[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "ferry: missing build packages: ${need[*]} (on Debian: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
python_deps
docker_up
