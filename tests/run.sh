#!/usr/bin/env bash
# Runs every check and test of tidemark: formatting, lints, unit, property,
# simulation and doc tests, benchmarks in test mode, a brief fuzz run, the
# wasm build of the core, the browser package's tests in headless Chromium
# (wasm-bindgen-test, in a page and in a dedicated worker), and the demo
# page's Playwright tests. It installs what it needs when missing (the wasm32
# target, wasm-bindgen-cli at the locked version, Debian's chromium,
# chromium-driver, curl and redis-server, the npm packages) and is quick when
# all is there. The Redis tests run against a redis-server this script starts
# on a free loopback port and stops at the end.
#
# It ends with "tidemark: N passed, 0 failed" when everything passed. When a
# step fails it stops there (a test step after running all its tests),
# says which step and which command failed, lists what failed in that
# step's output (cargo's and wasm-bindgen-test's "test NAME ... FAILED",
# the test targets that failed, compiler, clippy and rustfmt errors with
# their locations, node's "not ok"), and exits non-zero.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
redis_dir=$(mktemp -d)
redis_pid=""
current_step=""
step_start=0
current_command=""
failed_command=""

step() {
  printf '\n==> %s\n' "$*"
  current_step=$*
  step_start=$(wc -c <"$log")
}

# Runs a command with its output also in the log, where the summary counts
# tests and a failure report finds the failing ones.
logged() {
  current_command="$*"
  "$@" 2>&1 | tee -a "$log"
  current_command=""
}

# What failed, from the current step's part of the log (40 lines at most).
failing_tests() {
  tail -c +"$((step_start + 1))" "$log" |
    grep -E '^test .* \.\.\. FAIL(ED)?$|^error|^    `-p |^ *--> |^Diff in |^ *not ok ' |
    sed 's/^ */  /' | awk 'NR <= 40 { print } END { if (NR > 40) printf "  (%d more)\n", NR - 40 }' || true
}

on_exit() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    printf '\ntidemark: step "%s" failed (exit status %s)\n' "${current_step:-start}" "$status" >&2
    if [ -n "$failed_command" ]; then
      printf 'tidemark: failed command: %s\n' "$failed_command" >&2
    fi
    local failures
    failures=$(failing_tests)
    if [ -n "$failures" ]; then
      printf 'tidemark: what failed:\n%s\n' "$failures" >&2
    fi
  fi
  if [ -n "$redis_pid" ]; then
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  fi
  rm -rf "$log" "$redis_dir"
  exit "$status"
}
trap on_exit EXIT
# The first failing command; a pipeline in `logged` is named whole.
trap '[ -n "$failed_command" ] || failed_command=${current_command:-$BASH_COMMAND}' ERR

step "setup"
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi
for component in rustfmt clippy; do
  if ! rustup component list --installed | grep -q "^$component"; then
    rustup component add "$component"
  fi
done

# Debian packages: Chromium and its driver for the browser tests, curl for
# the test servers' readiness check, redis-server (with redis-cli) for the
# Redis store's tests.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v curl >/dev/null || missing+=(curl)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
  # The package may start a system redis on 6379; the tests start their own.
  if [[ " ${missing[*]} " == *" redis-server "* ]]; then
    $sudo systemctl disable --now redis-server >/dev/null 2>&1 ||
      $sudo service redis-server stop >/dev/null 2>&1 || true
  fi
fi

# wasm-bindgen-cli must match the wasm-bindgen crate in Cargo.lock exactly.
bindgen=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/[^0-9.]/, ""); print }' Cargo.lock)
if [ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $bindgen" ]; then
  # --locked can fail when a registry mirror lacks one locked dependency.
  cargo install wasm-bindgen-cli --version "=$bindgen" --locked ||
    cargo install wasm-bindgen-cli --version "=$bindgen"
fi

# npm packages (vite, playwright-core, wasm-opt, tsc), again when the lock changed.
lock_hash=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ "$(cat node_modules/.tidemark-lock 2>/dev/null)" != "$lock_hash" ]; then
  npm ci --no-audit --no-fund
  echo "$lock_hash" >node_modules/.tidemark-lock
fi

step "format"
logged cargo fmt --all -- --check

step "lint"
logged cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
logged cargo clippy -p tidemark-wasm --target wasm32-unknown-unknown --all-targets --locked -- -D warnings

step "redis-server on a free loopback port, for the Redis tests"
# A random port, until a server of ours answers on it: the process_id it
# reports must be the one started here, not some other Redis on that port.
for _ in $(seq 20); do
  port=$((20000 + RANDOM % 40000))
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$redis_dir" >"$redis_dir/redis.log" 2>&1 &
  redis_pid=$!
  for _ in $(seq 100); do
    kill -0 "$redis_pid" 2>/dev/null || break
    if redis-cli -p "$port" info server 2>/dev/null | grep -q "^process_id:$redis_pid"; then
      export TIDEMARK_TEST_REDIS="redis://127.0.0.1:$port/" TIDEMARK_TEST_REDIS_PID="$redis_pid"
      break 2
    fi
    sleep 0.1
  done
  kill "$redis_pid" 2>/dev/null || true
  wait "$redis_pid" 2>/dev/null || true
  redis_pid=""
done
if [ -z "${TIDEMARK_TEST_REDIS:-}" ]; then
  echo "could not start redis-server" >&2
  cat "$redis_dir/redis.log" >&2
  exit 1
fi
echo "$TIDEMARK_TEST_REDIS (pid $redis_pid)"

step "tests (unit, property, simulation, benchmarks in test mode)"
logged cargo test --workspace --all-targets --locked --no-fail-fast

step "doc tests"
logged cargo test --workspace --doc --locked --no-fail-fast

step "fuzz target, briefly: seeds and 200,000 random mutations (stable replay)"
fuzz=core/fuzz/Cargo.toml
logged cargo fmt --manifest-path "$fuzz" -- --check
logged cargo clippy --manifest-path "$fuzz" --release --locked --bins -- -D warnings
logged cargo run --manifest-path "$fuzz" --release --locked --bin replay -- --random 200000

step "core builds for wasm32-unknown-unknown"
logged cargo build -p tidemark-core --target wasm32-unknown-unknown --locked

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

step "browser host in headless Chromium (wasm-bindgen-test: IndexedDB, fetch, a dedicated worker)"
logged host-wasm/tests/with-server.sh env \
  CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
  CHROMEDRIVER="$(command -v chromedriver)" \
  cargo test --target wasm32-unknown-unknown -p tidemark-wasm --tests --locked --no-fail-fast

step "npm package tidemark: build, pack, install"
host-wasm/build.sh
pack=$(mktemp -d)
npm pack ./host-wasm/pkg --pack-destination "$pack" --silent >/dev/null
npm install --no-save --offline --no-audit --no-fund "$pack"/tidemark-*.tgz
rm -rf "$pack"
# The generated types, as a TypeScript user sees them.
npx tsc --noEmit --strict --target es2022 --module es2022 --moduleResolution bundler \
  --lib esnext,dom www/tests/types.ts

step "demo and benchmark pages, the MCP page (vite build), and the package for plain module pages"
npx vite build --config www/vite.config.js
npx vite build --config www/mcp/vite.config.js # after the first: it empties www/dist
mkdir -p www/dist/tidemark
cp host-wasm/pkg/* www/dist/tidemark/

step "pages in headless Chromium (Playwright): the JavaScript API, reloads mid-stream, failures, an MCP SDK client resuming a tool call; tidemark mcp against the SDK server"
cargo build -p tidemark --locked
logged node --test www/tests/

# cargo's "test result: ok. N passed; M failed" lines and node's "# pass N",
# "# fail N" summaries.
passed=$(grep -Eo '^test result: ok\. [0-9]+ passed|^# pass [0-9]+' "$log" | awk '{ s += ($1 == "#") ? $3 : $4 } END {print s + 0}')
failed=$(grep -Eo '[0-9]+ failed|^# fail [0-9]+' "$log" | awk '{ n = ($1 == "#") ? $3 : $1; s += n } END {print s + 0}')
printf '\ntidemark: %s passed, %s failed\n' "$passed" "$failed"
