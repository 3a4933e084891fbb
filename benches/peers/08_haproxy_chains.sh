#!/bin/bash
# 8. haproxy chains of as many processes as Ferry's circuits: iperf3 (one TCP stream, DUR s, RUNS
#    runs) through RELAYS (default "2 4") chained haproxy relays, configured as
#    ../shared/peers/03_tcp_relay.sh configures its own (mode tcp, nbthread 1, no splice).
#    Ferry h hops runs h + 1 processes between client and server (entry, relays, exit), so
#    haproxy_tcp_2hop sits beside ferry_1hop and haproxy_tcp_4hop beside ferry_3hop: what the
#    same number of plain forwarding processes carries on this machine, in the same run.
# The shared peers scripts (common.sh): PEERS, or ../shared/peers beside this checkout.
source "${PEERS:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)/shared/peers}/common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
RELAYS=${RELAYS:-2 4}
command -v haproxy >/dev/null || { echo "08_haproxy_chains.sh: needs haproxy (Debian: apt-get install haproxy)" >&2; exit 1; }
TMP=$(mktemp -d /tmp/peers_haproxy.XXXX)
cleanup() { kill_bg; rm -rf "$TMP"; }
trap cleanup EXIT

bg iperf3 -s -B 127.0.0.1 -p 5201
SERVER_PID=${BG_PIDS[0]}
wait_port 127.0.0.1 5201

for n in $RELAYS; do
  for k in $(seq 1 "$n"); do
    if [ "$k" = 1 ]; then next=5201; else next=$((5400 + k - 1)); fi
    haproxy_relay $((5400 + k)) "$next"
  done
  repeat_iperf "haproxy_tcp_${n}hop" iperf3 -c 127.0.0.1 -p $((5400 + n)) -t "$DUR"
  # Everything but the iperf3 server goes before the next chain.
  keep=()
  for p in "${BG_PIDS[@]}"; do
    if [ "$p" = "$SERVER_PID" ]; then keep+=("$p"); else kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; fi
  done
  BG_PIDS=("${keep[@]}")
done
