#!/usr/bin/env bash
# Runs a command with `tidemark serve` instances for the browser tests
# (host-wasm/tests/fetch.rs), and stops them when the command ends.
#
#   host-wasm/tests/with-server.sh env \
#     CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
#     CHROMEDRIVER=/usr/bin/chromedriver \
#     cargo test --target wasm32-unknown-unknown -p tidemark-wasm --test fetch
#
# Exports (read at compile time by the tests with option_env!):
#   TIDEMARK_TEST_SERVER         chaotic server: ids 1..100 every 5 ms, drops
#                                every connection after 7 events, replays 3
#                                too many on reconnect, serves a static page
#   TIDEMARK_TEST_STEADY_SERVER  endless server, one event a minute (its
#                                connections stay open)
#   TIDEMARK_TEST_CLOSED_URL     a loopback URL nothing listens on
# Each server binds port 0 and prints its address; the script checks that
# the address serves this run's random token before it runs the command.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ "$#" -eq 0 ]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi

(cd "$root" && cargo build --quiet -p tidemark)
bin="${CARGO_TARGET_DIR:-$root/target}/debug/tidemark"
if [ -n "${CARGO_TARGET_DIR:-}" ] && [[ "$CARGO_TARGET_DIR" != /* ]]; then
  bin="$root/$CARGO_TARGET_DIR/debug/tidemark"
fi

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

token="tidemark-test-$RANDOM$RANDOM$RANDOM"
mkdir "$work/www"
printf '<!doctype html><title>%s</title>\n' "$token" >"$work/www/index.html"

# Starts `tidemark serve --listen 127.0.0.1:0 ARGS...`; sets $addr.
start() {
  local name="$1"
  shift
  "$bin" serve --listen 127.0.0.1:0 --www "$work/www" "$@" >"$work/$name.out" 2>"$work/$name.err" &
  pids+=("$!")
  addr=""
  for _ in $(seq 100); do
    addr="$(head -n 1 "$work/$name.out" 2>/dev/null || true)"
    [ -n "$addr" ] && break
    kill -0 "${pids[-1]}" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$addr" ]; then
    echo "with-server.sh: $name server did not start:" >&2
    cat "$work/$name.err" >&2
    exit 1
  fi
  # The port is ours: it serves this run's token.
  if ! curl -fsS "http://$addr/" | grep -qF "$token"; then
    echo "with-server.sh: http://$addr/ is not the $name server just started" >&2
    exit 1
  fi
}

start chaos --count 100 --interval-ms 5 --drop-every 7 --rewind 3 --retry-ms 10
export TIDEMARK_TEST_SERVER="http://$addr"
start steady --interval-ms 60000
export TIDEMARK_TEST_STEADY_SERVER="http://$addr"
# A port that was just ours and is closed now.
start closed
kill "${pids[-1]}"
wait "${pids[-1]}" 2>/dev/null || true
unset 'pids[-1]'
export TIDEMARK_TEST_CLOSED_URL="http://$addr/events"
if curl -fsS --max-time 2 "$TIDEMARK_TEST_CLOSED_URL" >/dev/null 2>&1; then
  echo "with-server.sh: $TIDEMARK_TEST_CLOSED_URL still answers" >&2
  exit 1
fi

echo "with-server.sh: chaos $TIDEMARK_TEST_SERVER, steady $TIDEMARK_TEST_STEADY_SERVER," \
  "closed $TIDEMARK_TEST_CLOSED_URL" >&2
status=0
"$@" || status=$?
exit "$status"
