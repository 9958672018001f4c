#!/usr/bin/env bash
# One stream, one curl client: CPU per event (`perf stat` task-clock of the
# middle process, finer than the /proc ticks of `--bench proxy`), page faults
# and events/s through Debian's nginx (`proxy_buffering off`) and through
# `tidemark proxy`, against the same `tidemark serve` upstream, alternating
# in each round. See BENCHMARKS.md ("Issue 14, fourth round").
#
#   cargo build --release -p tidemark
#   host-native/benches/support/proxy_vs_nginx.sh [EVENTS] [ROUNDS] [RETAIN]
#
# RETAIN (default: EVENTS, every event kept, as `--bench proxy` does so that
# the client never falls behind retention) below EVENTS shows the steady
# state of a log at its retention, whose memory is reused; the client may
# then get gap events, so its events/s is not comparable, only the CPU.
# PROXY_ARGS adds flags to the proxy (e.g. PROXY_ARGS="--log DIR", a new
# directory); TIDEMARK_BIN picks the binary (to compare two builds).
# Needs nginx, perf and curl; loopback only; stops by itself.
set -euo pipefail
events=${1:-3000000}
rounds=${2:-5}
retain=${3:-$events}
root=$(cd "$(dirname "$0")/../../.." && pwd)
bin=${TIDEMARK_BIN:-$root/target/release/tidemark}
dir=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

# The first line a process prints: its address.
address() {
    for _ in $(seq 100); do
        if [ -s "$1" ]; then head -1 "$1"; return; fi
        sleep 0.05
    done
    echo "no address in $1" >&2
    exit 1
}

"$bin" serve --listen 127.0.0.1:0 --interval-ms 0 --count "$events" >"$dir/serve.out" 2>/dev/null &
pids+=($!)
upstream=$(address "$dir/serve.out")

# shellcheck disable=SC2086 # PROXY_ARGS is a list of flags
"$bin" proxy --upstream "http://$upstream" --listen 127.0.0.1:0 ${PROXY_ARGS:-} --retain "$retain" \
    --max-stream-bytes $((events * 256)) >"$dir/proxy.out" 2>"$dir/proxy.err" &
proxy=$!
pids+=("$proxy")
proxy_addr=$(address "$dir/proxy.out")

nginx_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$dir"/{body,proxy,fastcgi,uwsgi,scgi}
cat >"$dir/nginx.conf" <<CONF
daemon off; master_process on; worker_processes 1;
pid $dir/nginx.pid; error_log $dir/error.log warn;
events { worker_connections 1024; }
http {
  access_log off; client_body_temp_path $dir/body; proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi; uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
      proxy_pass http://$upstream; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off; proxy_cache off; proxy_read_timeout 3600s;
    }
  }
}
CONF
nginx -e "$dir/error.log" -c "$dir/nginx.conf" &
pids+=($!)
for _ in $(seq 100); do
    worker=$(pgrep -P "${pids[-1]}" || true)
    [ -n "$worker" ] && break
    sleep 0.05
done

# One client read of a new stream through `name` (pid, address), until
# `bytes` bytes per event have come (24 through nginx: `id: N`, `data: N`;
# 57 through the proxy, whose ids are `<token>-<seq>`).
measure() {
    local name=$1 pid=$2 addr=$3 bytes=$4
    perf stat -x, -e task-clock,page-faults -p "$pid" -o "$dir/stat.csv" &
    local stat=$!
    sleep 0.2
    local start end
    start=$(date +%s.%N)
    curl -sN "http://$addr/events?round=$RANDOM$RANDOM" 2>/dev/null | head -c $((events * bytes)) >/dev/null || true
    end=$(date +%s.%N)
    sleep 0.1
    kill -INT "$stat"
    wait "$stat" || true
    awk -F, -v n="$events" -v wall="$(echo "$end - $start" | bc)" -v name="$name" '
        /task-clock/ { ms = $1 } /page-faults/ { faults = $1 }
        END { printf "| %s | %.0f | %.4f | %.1f |\n", name, n / wall, ms * 1000 / n, faults * 1000 / n }
    ' "$dir/stat.csv"
}

echo "$events events per round, $rounds rounds, --retain $retain, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| path | events/s | CPU µs/event | page faults per 1,000 events |"
echo "|---|---|---|---|"
for _ in $(seq "$rounds"); do
    measure nginx "$worker" "127.0.0.1:$nginx_port" 24
    measure "tidemark proxy" "$proxy" "$proxy_addr" 57
done
