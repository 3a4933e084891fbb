# Ferry's two everyday commands: `make demo` and `make test`.
.PHONY: demo test bench lint

# A local mesh of 6 nodes in 6 jurisdictions with a SOCKS5 entry on 127.0.0.1:1080.
demo:
	@scripts/ensure-deps.sh build
	cargo run --release -- demo

# The whole test suite: unit and property tests, and multi-process mesh tests
# (they run the `ferry` binary, which `cargo test` builds for node/tests).
test:
	@scripts/ensure-deps.sh test
	cargo test --workspace

# Goodput harness (direct TCP, 1-hop and 3-hop circuits) and criterion benches.
bench:
	@scripts/ensure-deps.sh build
	cargo build --release --workspace --bins
	cargo run --release -p ferry-bench --bin goodput
	cargo bench -p ferry-bench

# fmt and clippy (reusing the RocksDB library a test build made; see the script).
lint:
	scripts/lint.sh
