#!/usr/bin/env bash
# Runs the fuzz targets (fuzz/) on their corpora.
#   scripts/fuzz.sh [RUNS [TARGET...]]   RUNS executions of each target
#                                        (default 10,000,000), in turn
#   FERRY_FUZZ_SECS=N scripts/fuzz.sh    N seconds of each instead (CI: brief)
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Builds without a sanitizer (Ferry's crates forbid `unsafe`; what is
# looked for is a panic, an overflow, a hang or an allocation sized by
# input) and with debug assertions and overflow checks. The build goes to
# $FERRY_FUZZ_TARGET_DIR (default /var/cache/ferry/fuzz-target if writable,
# else fuzz/target). New inputs that reach new code are added to
# fuzz/corpus/TARGET; minimise them with `cargo +nightly fuzz cmin` before
# committing. Prints each target's executions, rate and time (what
# fuzz/README.md records) and stops at the first crash, whose input is in
# fuzz/artifacts/TARGET.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
runs="${1:-10000000}"
shift || true
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 2; }
rustup run nightly rustc -V >/dev/null 2>&1 || { echo "fuzz: the nightly toolchain is missing: rustup toolchain install nightly" >&2; exit 2; }
dir="${FERRY_FUZZ_TARGET_DIR:-}"
if [ -z "$dir" ]; then
  if mkdir -p /var/cache/ferry/fuzz-target 2>/dev/null && [ -w /var/cache/ferry/fuzz-target ]; then
    dir=/var/cache/ferry/fuzz-target
  else
    dir=target
  fi
fi
flags=(-s none --target-dir "$dir")
if [ $# -gt 0 ]; then targets="$*"; else targets=$(sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | grep -v '^ferry-fuzz$'); fi
# Brief runs (CI) keep what they find in a scratch folder, not in the
# committed corpora; long runs add to the corpora, to be minimised.
scratch=""
if [ -n "${FERRY_FUZZ_SECS:-}" ]; then
  limit=(-max_total_time="$FERRY_FUZZ_SECS")
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
else
  limit=(-runs="$runs")
fi
echo "fuzz: building the targets (nightly, $dir)"
cargo +nightly fuzz build "${flags[@]}"
for t in $targets; do
  mkdir -p "corpus/$t"
  # The config target's seed is the whole config template (about 10 KB).
  max_len=4096
  [ "$t" = config ] && max_len=16384
  start=$SECONDS
  dirs=("corpus/$t")
  if [ -n "$scratch" ]; then mkdir -p "$scratch/$t"; dirs=("$scratch/$t" "corpus/$t"); fi
  out=$(cargo +nightly fuzz run "${flags[@]}" "$t" "${dirs[@]}" -- "${limit[@]}" \
    -rss_limit_mb=2048 -max_len="$max_len" -timeout=10 -print_final_stats=1 2>&1) || {
    echo "$out" | tail -40; echo "fuzz: $t failed (the input is in fuzz/artifacts/$t)" >&2; exit 1; }
  execs=$(echo "$out" | sed -n 's/^stat::number_of_executed_units: *//p' | tail -1) || true
  rate=$(echo "$out" | sed -n 's/^stat::average_exec_per_sec: *//p' | tail -1) || true
  cov=$(echo "$out" | grep -oE 'cov: [0-9]+' | tail -1) || true
  echo "$t: ${execs:-?} executions, ${rate:-?}/s, ${cov:-cov: ?}, $((SECONDS - start)) s, corpus $(ls "corpus/$t" | wc -l) inputs"
done
