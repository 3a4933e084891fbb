#!/bin/bash
# 9. The issue's ratios from paired, interleaved measurements. 03/04/06/07 measure each chain
#    in a block of RUNS runs, minutes apart from the chain it is compared with, and on this
#    shared machine the baselines drift by a third within the hour: the same build's 3-hop
#    ratio to haproxy read 0.42x in one session's run and 0.57x in the next. Here every chain
#    stands at once, and each of ROUNDS rounds (default 8) measures every chain once, in an
#    order that rotates by one each round; each ratio is taken within its round, and the
#    script prints every round's ratios, their median, min and max, and in how many rounds each
#    goal held.
#    Chains: direct; haproxy 1 and 3 relays (as ../shared/peers/03_tcp_relay.sh); socat
#    -b 131072 1 and 3 relays (latency baselines, as 06_latency.sh); stunnel TLS 1.3
#    AES-256-GCM with 3 links (4 processes, as 04_tls_relay.sh); Ferry 1 hop (entry, exit) and
#    3 hops (entry, relays DE and CH, exit IS) reached through the SOCKS5 entry with
#    proxychains4, one thread a process (FERRY_THREADS=N sets N; 0 is one per CPU), every node
#    admitted (as 07_ferry.sh).
#    Per round: iperf3 one TCP stream, DUR s (default 10), for the goodput chains; the 64-byte
#    ping-pong, N round trips (default 2000), for direct, socat and Ferry.
#    Goals (issue 16): Ferry 1 hop >= 0.7x haproxy 1 relay; 3 hops >= 0.5x haproxy 3 relays and
#    >= 1.2x stunnel 3 links; round trip added per process at p50 <= 1.5x socat's (1 hop against
#    socat's 1 relay, 3 hops against its 3 relays).
#    FERRY=path/to/ferry (release build). Needs iperf3 socat haproxy stunnel4 proxychains4 jq.
#    Writes RES_DIR/interleaved.tsv (one row per round and measure).
# The shared peers scripts (common.sh, tcp_pingpong.py): PEERS, or ../shared/peers beside this
# checkout.
source "${PEERS:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)/shared/peers}/common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
FERRY=${FERRY:?set FERRY to a release ferry binary}
ROUNDS=${ROUNDS:-8}
N=${N:-2000}
for c in iperf3 socat haproxy stunnel4 proxychains4 jq; do
  command -v $c >/dev/null || { echo "09_interleaved.sh: needs $c (Debian: apt-get install iperf3 socat haproxy stunnel4 proxychains4 jq)" >&2; exit 1; }
done
# Every daemon outlives the rounds (common.sh's bg bounds each by BG_TIMEOUT, 900 s by default):
# a round takes at most 6 iperf3 runs of DUR + 30 s (iperf_gbps's bound, one retry each) and 5
# ping-pong runs of 120 s, plus the pauses between.
BG_TIMEOUT=$((ROUNDS * (12 * (DUR + 32) + 5 * 121) + 600))
TMP=$(mktemp -d /tmp/peers_inter.XXXX)
cleanup() { kill_bg; rm -rf "$TMP"; }
trap cleanup EXIT
BG_LOG=$TMP/daemons.log
OUT=$RES_DIR/interleaved.tsv
printf 'round\tmeasure\tunit\tvalue\n' >"$OUT"

# A mesh of a run just ended may still hold its ports while it drains (1 s for lib.sh's meshes,
# drain.grace_secs of 30 for others): wait for every port this run binds (2 minutes at most).
ports='(74(0[1-3]|1[1-5]|2[1-5]|3[01])|5201|5411|542[1-3]|5511|552[1-3]|5601|6000|60[12][12]|6031)'
taken() { ss -Hltn | awk '{print $4}' | grep -qE ":$ports\$"; }
for i in $(seq 1 120); do taken || break; sleep 1; done
if taken; then echo "09_interleaved.sh: ports this run needs are still taken (ss -ltn)" >&2; exit 1; fi

# Servers: iperf3 on 5201, the ping-pong echo on 5601.
bg iperf3 -s -B 127.0.0.1 -p 5201
bg python3 "$PEERS_DIR/tcp_pingpong.py" serve 127.0.0.1 5601 "$BG_TIMEOUT"
wait_port 127.0.0.1 5201; wait_port 127.0.0.1 5601

# haproxy: 1 relay on 5411; 3 relays 5423 -> 5422 -> 5421 -> iperf3.
haproxy_relay 5411 5201
haproxy_relay 5421 5201; haproxy_relay 5422 5421; haproxy_relay 5423 5422

# socat -b 131072 to the echo server: 1 relay on 5511; 3 relays 5523 -> 5522 -> 5521.
socat_relay() {  # LISTEN NEXT
  bg socat -b 131072 TCP-LISTEN:$1,bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.1:$2; wait_port 127.0.0.1 "$1"
}
socat_relay 5511 5601
socat_relay 5521 5601; socat_relay 5522 5521; socat_relay 5523 5522

# stunnel, 3 links: entry 6000 -> relay 1 (6011 in, 6012 plain, out) -> relay 2 (6021, 6022) -> exit 6031 -> iperf3.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=peers-bench -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
hdr() { printf 'foreground = yes\npid =\ndebug = 3\nsslVersionMin = TLSv1.3\nciphersuites = TLS_AES_256_GCM_SHA384\n'; }
{ hdr; printf '[x]\naccept = 127.0.0.1:6031\nconnect = 127.0.0.1:5201\ncert = %s\nkey = %s\n' "$TMP/cert.pem" "$TMP/key.pem"; } >"$TMP/st-exit.conf"
bg stunnel4 "$TMP/st-exit.conf"; wait_port 127.0.0.1 6031
for k in 2 1; do
  { hdr
    printf '[in]\naccept = 127.0.0.1:%d\nconnect = 127.0.0.1:%d\ncert = %s\nkey = %s\n' $((6001 + 10 * k)) $((6002 + 10 * k)) "$TMP/cert.pem" "$TMP/key.pem"
    printf '[out]\nclient = yes\naccept = 127.0.0.1:%d\nconnect = 127.0.0.1:%d\n' $((6002 + 10 * k)) $((6011 + 10 * k)); } >"$TMP/st-relay$k.conf"
  bg stunnel4 "$TMP/st-relay$k.conf"; wait_port 127.0.0.1 $((6001 + 10 * k))
done
{ hdr; printf '[e]\nclient = yes\naccept = 127.0.0.1:6000\nconnect = 127.0.0.1:6011\n'; } >"$TMP/st-entry.conf"
bg stunnel4 "$TMP/st-entry.conf"; wait_port 127.0.0.1 6000

# Ferry, as 07_ferry.sh: relays DE, CH, exit IS; entry A (3 hops) on 7430, entry B (1 hop) on 7431.
ferry_mesh "$FERRY" "${FERRY_THREADS:-1}" || exit 1
for h in 1 3; do
  printf 'strict_chain\nquiet_mode\nproxy_dns\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n[ProxyList]\nsocks5 127.0.0.1 %s\n' \
    "$([ $h = 3 ] && echo 7430 || echo 7431)" >"$TMP/pc$h.conf"
  # Warm: the circuit is built before the first measure.
  proxychains4 -q -f "$TMP/pc$h.conf" python3 "$PEERS_DIR/tcp_pingpong.py" ping 127.0.0.1 5601 200 64 >/dev/null ||
    { echo "09_interleaved.sh: no round trip through the $h-hop Ferry chain" >&2; exit 1; }
done

# The ping-pong's p50 (its first field), or NaN.
p50() { local out; out=$(timeout 120 "$@") || { echo NaN; return; }; echo "${out%% *}"; }
# measure NAME: one measure's value.
measure() {
  case $1 in
    direct) iperf_gbps iperf3 -c 127.0.0.1 -p 5201 -t "$DUR" ;;
    haproxy_1) iperf_gbps iperf3 -c 127.0.0.1 -p 5411 -t "$DUR" ;;
    haproxy_3) iperf_gbps iperf3 -c 127.0.0.1 -p 5423 -t "$DUR" ;;
    stunnel_3link) iperf_gbps iperf3 -c 127.0.0.1 -p 6000 -t "$DUR" ;;
    ferry_1hop) iperf_gbps proxychains4 -q -f "$TMP/pc1.conf" iperf3 -c 127.0.0.1 -p 5201 -t "$DUR" ;;
    ferry_3hop) iperf_gbps proxychains4 -q -f "$TMP/pc3.conf" iperf3 -c 127.0.0.1 -p 5201 -t "$DUR" ;;
    lat_direct) p50 python3 "$PEERS_DIR/tcp_pingpong.py" ping 127.0.0.1 5601 "$N" 64 ;;
    lat_socat_1) p50 python3 "$PEERS_DIR/tcp_pingpong.py" ping 127.0.0.1 5511 "$N" 64 ;;
    lat_socat_3) p50 python3 "$PEERS_DIR/tcp_pingpong.py" ping 127.0.0.1 5523 "$N" 64 ;;
    lat_ferry_1hop) p50 proxychains4 -q -f "$TMP/pc1.conf" python3 "$PEERS_DIR/tcp_pingpong.py" ping 127.0.0.1 5601 "$N" 64 ;;
    lat_ferry_3hop) p50 proxychains4 -q -f "$TMP/pc3.conf" python3 "$PEERS_DIR/tcp_pingpong.py" ping 127.0.0.1 5601 "$N" 64 ;;
  esac
}
measures=(direct haproxy_1 haproxy_3 stunnel_3link ferry_1hop ferry_3hop
  lat_direct lat_socat_1 lat_socat_3 lat_ferry_1hop lat_ferry_3hop)
n=${#measures[@]}
for r in $(seq 1 "$ROUNDS"); do
  for j in $(seq 0 $((n - 1))); do
    name=${measures[$(((j + r - 1) % n))]}
    unit=$([ "${name#lat_}" = "$name" ] && echo Gbit/s || echo us)
    v=$(measure "$name")
    printf '%s\t%s\t%s\t%s\n' "$r" "$name" "$unit" "$v" >>"$OUT"
    sleep 1
  done
  echo "09_interleaved.sh: round $r of $ROUNDS done" >&2
done

python3 - "$OUT" <<'EOF'
import collections, math, statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
by = collections.defaultdict(dict)
for r, name, _, v in rows:
    # A failed measure (NaN, or nothing) drops the ratios of its round only.
    try:
        x = float(v)
    except ValueError:
        continue
    if math.isfinite(x):
        by[int(r)][name] = x
def per_process(m, chain, procs):
    added = (m[chain] - m["lat_direct"]) / procs
    if added <= 0:
        raise ZeroDivisionError  # a chain no slower than direct: the round is noise
    return added
ratios = [
    ("ferry 1 hop / haproxy 1 relay", ">=", 0.7, lambda m: m["ferry_1hop"] / m["haproxy_1"]),
    ("ferry 3 hops / haproxy 3 relays", ">=", 0.5, lambda m: m["ferry_3hop"] / m["haproxy_3"]),
    ("ferry 3 hops / stunnel 3 links", ">=", 1.2, lambda m: m["ferry_3hop"] / m["stunnel_3link"]),
    ("added p50 per process, ferry 1 hop / socat 1 relay", "<=", 1.5,
     lambda m: per_process(m, "lat_ferry_1hop", 2) / per_process(m, "lat_socat_1", 1)),
    ("added p50 per process, ferry 3 hops / socat 3 relays", "<=", 1.5,
     lambda m: per_process(m, "lat_ferry_3hop", 4) / per_process(m, "lat_socat_3", 3)),
]
names = sorted({n for m in by.values() for n in m})
print("medians over rounds:", ", ".join(f"{n} {statistics.median(m[n] for m in by.values() if n in m):.2f}" for n in names))
for label, op, goal, f in ratios:
    vals = []
    for r in sorted(by):
        try:
            vals.append(f(by[r]))
        except (KeyError, ZeroDivisionError):
            pass
    if not vals:
        print(f"{label}: no complete round"); continue
    held = sum(1 for v in vals if (v >= goal if op == ">=" else v <= goal))
    print(f"{label}: median {statistics.median(vals):.2f}, min {min(vals):.2f}, max {max(vals):.2f}; "
          f"goal {op} {goal} held in {held} of {len(vals)} rounds; rounds: " + " ".join(f"{v:.2f}" for v in vals))
EOF
