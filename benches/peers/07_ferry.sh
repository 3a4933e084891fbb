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
FERRY=${FERRY:?set FERRY to a release ferry binary}
THREADS=${FERRY_THREADS:-1}
sfx=$([ "$THREADS" = 1 ] || echo "_threads$THREADS")${NAME:+_$NAME}
TMP=$(mktemp -d /tmp/peers_ferry.XXXX)
cleanup() { kill_bg; rm -rf "$TMP"; }
trap cleanup EXIT
BG_LOG=$TMP/ferry.log
$FERRY authority keygen --out "$TMP/auth" >/dev/null
A="--authority-key $TMP/auth/authority.pub"
$FERRY init --dir "$TMP/n1" --jurisdiction DE --roles relay $A --listen 127.0.0.1:7401 --mesh 127.0.0.1:7411 --admin 127.0.0.1:7421 >/dev/null
$FERRY init --dir "$TMP/n2" --jurisdiction CH --roles relay $A --listen 127.0.0.1:7402 --mesh 127.0.0.1:7412 --admin 127.0.0.1:7422 --bootstrap 127.0.0.1:7411 >/dev/null
$FERRY init --dir "$TMP/n3" --jurisdiction IS --roles exit $A --listen 127.0.0.1:7403 --mesh 127.0.0.1:7413 --admin 127.0.0.1:7423 --bootstrap 127.0.0.1:7411 >/dev/null
$FERRY init --dir "$TMP/ea" --jurisdiction NL --roles entry $A --socks 127.0.0.1:7430 --mesh 127.0.0.1:7414 --admin 127.0.0.1:7424 --bootstrap 127.0.0.1:7411 >/dev/null
$FERRY init --dir "$TMP/eb" --jurisdiction NL --roles entry $A --socks 127.0.0.1:7431 --mesh 127.0.0.1:7415 --admin 127.0.0.1:7425 --bootstrap 127.0.0.1:7411 >/dev/null
for nj in n1:DE n2:CH n3:IS ea:NL eb:NL; do n=${nj%%:*}; j=${nj##*:}; $FERRY authority admit --key "$TMP/auth/authority.key" --request "$TMP/$n/node.request" --jurisdiction $j --capacity-max 1000 --out "$TMP/$n/node.cert" >/dev/null; done
sed -i "s/allow_private = false/allow_private = true/" "$TMP/n3/ferry.toml"
sed -i 's/^hops = 3/hops = 1/' "$TMP/eb/ferry.toml"
for n in n1 n2 n3 ea eb; do
  sed -i "s/^threads = 0/threads = $THREADS/" "$TMP/$n/ferry.toml"
  grep -q "^threads = $THREADS\$" "$TMP/$n/ferry.toml" ||
    { echo "07_ferry.sh: $FERRY writes no node.threads (a build before it?)" >&2; exit 1; }
done
for n in n1 n2 n3; do bg $FERRY node --config "$TMP/$n/ferry.toml"; done
for n in ea eb; do bg $FERRY connect --config "$TMP/$n/ferry.toml"; done
wait_port 127.0.0.1 7430; wait_port 127.0.0.1 7431
for p in 7424 7425; do
  for i in $(seq 1 60); do
    n=$($FERRY status --admin 127.0.0.1:$p --json 2>/dev/null | jq '.peers | length' 2>/dev/null)
    [ "${n:-0}" -ge 3 ] && break; sleep 1
  done
done
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
