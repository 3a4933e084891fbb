# shellcheck shell=bash
# What Ferry's peers scripts (07, 08, 09) share. Source after ../shared/peers/common.sh, with
# TMP set to the script's scratch folder; don't run.

# haproxy_relay LISTEN NEXT: one haproxy relay on 127.0.0.1:LISTEN to 127.0.0.1:NEXT, configured
# as ../shared/peers/03_tcp_relay.sh configures its own (mode tcp, nbthread 1, no splice).
haproxy_relay() {
  cat >"$TMP/hap$1.cfg" <<CFG
global
  nbthread 1
  maxconn 64
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend f
  bind 127.0.0.1:$1
  default_backend b
backend b
  server s 127.0.0.1:$2
CFG
  bg haproxy -db -f "$TMP/hap$1.cfg"
  wait_port 127.0.0.1 "$1"
}

# ferry_mesh FERRY THREADS: a loopback mesh of FERRY (a release binary), every node admitted by
# a fresh authority and run with THREADS worker threads: relays DE (7401) and CH (7402), exit
# IS (7403, private targets allowed), entry A (SOCKS5 on 7430, 3 hops) and entry B (SOCKS5 on
# 7431, 1 hop); mesh ports 7411-7415, admin 7421-7425. Each node drains for 1 s on SIGTERM
# (drain.grace_secs; 30 by default), so the mesh is gone, ports and all, soon after the script
# (kill_bg stops the `timeout` wrappers, and a node outlives its wrapper by its drain). Returns
# once both entries see the three relay-capable nodes (a minute at most each).
ferry_mesh() {
  local ferry=$1 threads=$2 a n j nj p i
  $ferry authority keygen --out "$TMP/auth" >/dev/null
  a="--authority-key $TMP/auth/authority.pub"
  $ferry init --dir "$TMP/n1" --jurisdiction DE --roles relay $a --listen 127.0.0.1:7401 --mesh 127.0.0.1:7411 --admin 127.0.0.1:7421 >/dev/null
  $ferry init --dir "$TMP/n2" --jurisdiction CH --roles relay $a --listen 127.0.0.1:7402 --mesh 127.0.0.1:7412 --admin 127.0.0.1:7422 --bootstrap 127.0.0.1:7411 >/dev/null
  $ferry init --dir "$TMP/n3" --jurisdiction IS --roles exit $a --listen 127.0.0.1:7403 --mesh 127.0.0.1:7413 --admin 127.0.0.1:7423 --bootstrap 127.0.0.1:7411 >/dev/null
  $ferry init --dir "$TMP/ea" --jurisdiction NL --roles entry $a --socks 127.0.0.1:7430 --mesh 127.0.0.1:7414 --admin 127.0.0.1:7424 --bootstrap 127.0.0.1:7411 >/dev/null
  $ferry init --dir "$TMP/eb" --jurisdiction NL --roles entry $a --socks 127.0.0.1:7431 --mesh 127.0.0.1:7415 --admin 127.0.0.1:7425 --bootstrap 127.0.0.1:7411 >/dev/null
  for nj in n1:DE n2:CH n3:IS ea:NL eb:NL; do
    n=${nj%%:*}; j=${nj##*:}
    $ferry authority admit --key "$TMP/auth/authority.key" --request "$TMP/$n/node.request" --jurisdiction "$j" --capacity-max 1000 --out "$TMP/$n/node.cert" >/dev/null
  done
  sed -i "s/allow_private = false/allow_private = true/" "$TMP/n3/ferry.toml"
  sed -i 's/^hops = 3/hops = 1/' "$TMP/eb/ferry.toml"
  for n in n1 n2 n3 ea eb; do
    sed -i -e "s/^threads = 0/threads = $threads/" -e 's/^grace_secs = 30$/grace_secs = 1/' "$TMP/$n/ferry.toml"
    grep -q "^threads = $threads\$" "$TMP/$n/ferry.toml" ||
      { echo "peers: $ferry writes no node.threads (a build before it?)" >&2; return 1; }
    grep -q '^grace_secs = 1$' "$TMP/$n/ferry.toml" ||
      { echo "peers: $ferry writes no drain.grace_secs = 30 to shorten" >&2; return 1; }
  done
  for n in n1 n2 n3; do bg "$ferry" node --config "$TMP/$n/ferry.toml"; done
  for n in ea eb; do bg "$ferry" connect --config "$TMP/$n/ferry.toml"; done
  wait_port 127.0.0.1 7430; wait_port 127.0.0.1 7431
  for p in 7424 7425; do
    for i in $(seq 1 60); do
      n=$($ferry status --admin 127.0.0.1:$p --json 2>/dev/null | jq '.peers | length' 2>/dev/null)
      [ "${n:-0}" -ge 3 ] && break; sleep 1
    done
  done
}
