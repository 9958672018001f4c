#!/usr/bin/env bash
# Runs every check and test of tidemark: formatting, lints, unit, property,
# simulation and doc tests, benchmarks in test mode, a brief fuzz run, and the
# wasm build of the core. It installs what it needs when missing and is quick when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT

step "setup"
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi
for component in rustfmt clippy; do
  if ! rustup component list --installed | grep -q "^$component"; then
    rustup component add "$component"
  fi
done

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "tests (unit, property, simulation, benchmarks in test mode)"
cargo test --workspace --all-targets --locked 2>&1 | tee -a "$log"

step "doc tests"
cargo test --workspace --doc --locked 2>&1 | tee -a "$log"

step "fuzz target, briefly: seeds and 200,000 random mutations (stable replay)"
fuzz=core/fuzz/Cargo.toml
cargo fmt --manifest-path "$fuzz" -- --check
cargo clippy --manifest-path "$fuzz" --release --locked --bins -- -D warnings
cargo run --manifest-path "$fuzz" --release --locked --bin replay -- --random 200000

step "core builds for wasm32-unknown-unknown"
cargo build -p tidemark-core --target wasm32-unknown-unknown --locked

step "core reads no clock"
if grep -rnE '^[^/]*(Instant|SystemTime)::now' core/src; then
  echo "tidemark-core must take time from its Clock" >&2
  exit 1
fi
echo "none"

step "core depends on no runtime"
if cargo tree -p tidemark-core -e normal --target all --prefix none --locked |
  grep -E '^(tokio|smol|async-io|async-std|async-executor) '; then
  echo "tidemark-core must not depend on an async runtime" >&2
  exit 1
fi
echo "none"

passed=$(grep -Eo '^test result: ok\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s += $1} END {print s + 0}')
printf '\ntidemark: %s passed, %s failed\n' "$passed" "$failed"
