#!/bin/bash
# 7. (Ferry's copy of ../shared/peers/07_ferry.sh, with every node admitted by the
#    authority: nodes without a certificate carry nothing since issue 14.)
#    Ferry measured with the same tools as the peers: iperf3 (one TCP stream, DUR s, RUNS runs) through a
#    ferry entry via proxychains4 (it hooks connect() only; bytes flow untouched), and the 64-byte TCP
#    ping-pong through the SOCKS5 entry. Mesh on loopback: relays DE, CH; exit IS; entry A (hops 3) and
#    entry B (hops 1). FERRY=path/to/ferry (release build).
#    Process counts between client and server: Ferry 1 hop = 2 (entry, exit); 3 hops = 4.
#    Peers: haproxy/socat k relays = k; stunnel L links = L+1.
#    Each Ferry process runs on one thread (node.threads = 1), as the haproxy relays do
#    (nbthread 1): FERRY_THREADS=N sets N (0: one per CPU, the node's default), and
#    its rows are then named ferry_*_threadsN. NAME=X adds _X to every row's name (to run two
#    builds in one session: FERRY=a NAME=a ...; FERRY=b NAME=b ...).
# The shared peers scripts (common.sh, tcp_pingpong.py): PEERS, or ../shared/peers
# beside this checkout.
source "${PEERS:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)/shared/peers}/common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
FERRY=${FERRY:?set FERRY to a release ferry binary}
THREADS=${FERRY_THREADS:-1}
sfx=$([ "$THREADS" = 1 ] || echo "_threads$THREADS")${NAME:+_$NAME}
TMP=$(mktemp -d /tmp/peers_ferry.XXXX)
cleanup() { kill_bg; rm -rf "$TMP"; }
trap cleanup EXIT
BG_LOG=$TMP/ferry.log
ferry_mesh "$FERRY" "$THREADS" || exit 1
bg iperf3 -s -B 127.0.0.1 -p 5301
wait_port 127.0.0.1 5301
bg python3 "$PEERS_DIR/tcp_pingpong.py" serve 127.0.0.1 5602 900
wait_port 127.0.0.1 5602
for hops in 1 3; do
  port=$([ $hops = 3 ] && echo 7430 || echo 7431)
  printf 'strict_chain\nquiet_mode\nproxy_dns\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n[ProxyList]\nsocks5 127.0.0.1 %s\n' $port >"$TMP/pc$hops.conf"
  proxychains4 -q -f "$TMP/pc$hops.conf" python3 "$PEERS_DIR/tcp_pingpong.py" ping 127.0.0.1 5602 200 64 >/dev/null  # warm: build circuit
  repeat_iperf "ferry_${hops}hop$sfx" proxychains4 -q -f "$TMP/pc$hops.conf" iperf3 -c 127.0.0.1 -p 5301 -t "$DUR"
  p50s=(); p99s=()
  for i in $(seq 1 "$RUNS"); do
    out=$(timeout 120 proxychains4 -q -f "$TMP/pc$hops.conf" python3 "$PEERS_DIR/tcp_pingpong.py" ping 127.0.0.1 5602 5000 64)
    p50s+=("$(echo "$out" | cut -d' ' -f1)"); p99s+=("$(echo "$out" | cut -d' ' -f2)")
  done
  record "lat_ferry_${hops}hop${sfx}_p50" us "${p50s[@]}"
  record "lat_ferry_${hops}hop${sfx}_p99" us "${p99s[@]}"
done
# Same tools direct, in this run, for the ratio.
repeat_iperf "direct_same_run" iperf3 -c 127.0.0.1 -p 5301 -t "$DUR"
