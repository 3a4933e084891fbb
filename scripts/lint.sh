#!/usr/bin/env bash
# fmt and clippy over the whole workspace.
#
# clippy builds in check mode, which does not share build-script output with
# `cargo build`/`cargo test`, so RocksDB's C++ (the bulk of a fresh build)
# would be compiled a second time. If a test build already made the static
# library, point librocksdb-sys at it (ROCKSDB_LIB_DIR, ROCKSDB_STATIC): its
# build script then links that and compiles nothing. Without one, clippy
# simply builds it itself.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
target=${CARGO_TARGET_DIR:-target}
lib=$(find "$target/debug/build" -path '*librocksdb-sys-*/out/librocksdb.a' -print -quit 2>/dev/null || true)
if [ -n "$lib" ]; then
  export ROCKSDB_LIB_DIR=$(dirname "$lib") ROCKSDB_STATIC=1
fi
cargo clippy --workspace --all-targets -- -D warnings
