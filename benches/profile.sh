#!/usr/bin/env bash
# A CPU profile of one Ferry process under load, as a flamegraph, with a
# summary of where the time goes.
#
#   benches/profile.sh LOAD ROLE [SECS]
#
# LOAD: bulk | streams | small | circuits | mix | pingpong | pingbulk (see benches/src/bin/load.rs)
# ROLE: entry | relay | exit
#
# Runs `load` (a loopback mesh of release processes: relays DE and CH, exit
# IS, an entry) for SECS seconds (10 by default) while `perf record`
# samples ROLE's process (CPU time, DWARF call graphs), then folds the
# stacks with inferno and writes benches/flamegraphs/ROLE-LOAD.svg (set
# OUT_DIR to write elsewhere) and ROLE-LOAD.txt (the load's figures and the
# share of samples by kind: AEAD, kernel (system calls and the TCP stack
# under them), copies, allocation, locks, the async runtime, the rest).
#
# Needs perf (Debian: linux-perf) and inferno (installed with cargo if
# missing). Run as root, or with kernel.perf_event_paranoid <= 1.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: benches/profile.sh bulk|streams|small|circuits|mix|pingpong|pingbulk entry|relay|exit [SECS]"
load=${1:?$usage}
role=${2:?$usage}
secs=${3:-10}
out=${OUT_DIR:-benches/flamegraphs}
case $load in bulk | streams | small | circuits | mix | pingpong | pingbulk) ;; *) echo "$usage" >&2; exit 2 ;; esac
case $role in entry | relay | exit) ;; *) echo "$usage" >&2; exit 2 ;; esac

if ! command -v perf >/dev/null 2>&1; then
  echo "profile.sh: needs perf (on Debian: apt-get install linux-perf)" >&2
  exit 1
fi
if ! command -v inferno-flamegraph >/dev/null 2>&1; then
  echo "profile.sh: installing inferno (flamegraphs) with cargo" >&2
  cargo install --locked inferno@0.12.8 >&2
fi
scripts/ensure-deps.sh build
target=${CARGO_TARGET_DIR:-target}
echo "profile.sh: building release binaries" >&2
cargo build --release --workspace --bins -q

mkdir -p "$out"
work=$(mktemp -d /tmp/ferry-profile.XXXX)
# KEEP=1 keeps perf.data and the folded stacks (printed at the end).
[ -n "${KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
FERRY_BIN=${FERRY_BIN:-$target/release/ferry} \
  "$target/release/load" "$load" "$secs" "$role" "$work/perf.data" >"$work/figures.txt"

echo "profile.sh: folding stacks" >&2
perf script -i "$work/perf.data" 2>/dev/null | inferno-collapse-perf --all >"$work/folded"
name="$role-$load"
inferno-flamegraph --title "ferry $role under $load load ($secs s)" --width 1600 \
  <"$work/folded" >"$out/$name.svg"

python3 - "$work/folded" "$work/figures.txt" >"$out/$name.txt" <<'EOF'
import re, sys
# The first kind whose pattern matches a stack's frames takes its samples.
kinds = [
    ("AEAD (seal, open)", re.compile(r"aes|gcm|aead|chacha|poly1305|ghash", re.I)),
    ("kernel (system calls, TCP)", re.compile(r"_\[k\]")),
    ("copies (memcpy, memmove)", re.compile(r"memcpy|memmove")),
    ("allocation", re.compile(r"malloc|_int_free|cfree|realloc|__libc_free|alloc::alloc|sysmalloc")),
    ("locks", re.compile(r"futex|pthread_mutex|parking_lot|sync::mutex|Mutex")),
    ("async runtime (polls, wake-ups)", re.compile(r"tokio::runtime|tokio::sync|wake")),
]
totals = {k: 0 for k, _ in kinds}
rest = 0
all_ = 0
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    n = int(n)
    all_ += n
    frames = stack.split(";")
    for k, pat in kinds:
        # A kernel frame anywhere means time in the kernel; the other
        # kinds count where they are the leaf or near it (not a caller
        # that merely leads to one: every task runs under the runtime).
        tail = frames if k == kinds[1][0] else frames[-4:]
        if any(pat.search(f) for f in tail):
            totals[k] += n
            break
    else:
        rest += n
print(open(sys.argv[2]).read().rstrip())
print()
print(f"{all_} ns of CPU time of the profiled process, sampled")
for k, _ in kinds:
    print(f"{k:<34}{100 * totals[k] / max(all_, 1):6.1f} %")
print(f"{'the rest (Ferry, other user code)':<34}{100 * rest / max(all_, 1):6.1f} %")
EOF
cat "$out/$name.txt"
echo "profile.sh: wrote $out/$name.svg and $out/$name.txt" >&2
[ -z "${KEEP:-}" ] || echo "profile.sh: kept $work/perf.data and $work/folded" >&2
