#!/usr/bin/env bash
# Runs every fuzz target (fuzz/) on its corpus: `scripts/fuzz.sh [RUNS]`,
# 10,000,000 executions each by default (one core per target, in turn).
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# New inputs that reach new code are added to fuzz/corpus/TARGET; minimise
# them with `cargo +nightly fuzz cmin TARGET` before committing. Prints each
# target's executions and time (what fuzz/README.md records).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
runs="${1:-10000000}"
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 2; }
targets=$(sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | grep -v '^ferry-fuzz$')
for t in $targets; do
  mkdir -p "corpus/$t"
  start=$SECONDS
  out=$(cargo +nightly fuzz run "$t" "corpus/$t" -- -runs="$runs" -rss_limit_mb=2048 -max_len=4096 2>&1) || {
    echo "$out" | tail -40; echo "fuzz: $t failed (see fuzz/artifacts/$t)" >&2; exit 1; }
  done_line=$(echo "$out" | grep -E "^Done [0-9]+ runs" | tail -1)
  echo "$t: ${done_line:-?} ($((SECONDS - start)) s)"
done
