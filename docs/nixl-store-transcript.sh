#!/bin/bash
# Records: etcd, nixl-etcd serve, two stock NIXL agents, etcdctl, SIGKILL.
set -u
cd /work/wt17
D=$(mktemp -d)
etcd --name t --data-dir $D/d --listen-client-urls http://127.0.0.1:23979 --advertise-client-urls http://127.0.0.1:23979 \
  --listen-peer-urls http://127.0.0.1:23980 --initial-advertise-peer-urls http://127.0.0.1:23980 \
  --initial-cluster t=http://127.0.0.1:23980 --log-level warn >$D/etcd.log 2>&1 &
ETCD=$!
until curl -s http://127.0.0.1:23979/health | grep -q true; do sleep 0.1; done
export ETCDCTL_API=3
E=http://127.0.0.1:23979
say() { echo; echo "\$ $*"; }
say "VLLM_NIXL_ETCD_ENDPOINTS=$E nixl-etcd serve --listen 127.0.0.1:29479 &"
VLLM_NIXL_ETCD_ENDPOINTS=$E target/release/nixl-etcd serve --listen 127.0.0.1:29479 >$D/serve.out 2>$D/serve.err &
SERVE=$!
until grep -q ready $D/serve.out 2>/dev/null; do sleep 0.05; done
cat $D/serve.out
mkfifo $D/a.in $D/b.in
say "NIXL_TCPSTORE_ENDPOINT=127.0.0.1:29479 python3 python/tests/stock_nixl_agent.py prefill 1048576 3 &   # agent 'prefill', stock NIXL 1.5.1"
NIXL_LOG_LEVEL=WARN NIXL_TCPSTORE_ENDPOINT=127.0.0.1:29479 python3 python/tests/stock_nixl_agent.py prefill 1048576 3 <$D/a.in >$D/a.out 2>/dev/null &
A=$!
exec 7>$D/a.in
say "NIXL_TCPSTORE_ENDPOINT=127.0.0.1:29479 python3 python/tests/stock_nixl_agent.py decode 1048576 5 &    # agent 'decode'"
NIXL_LOG_LEVEL=WARN NIXL_TCPSTORE_ENDPOINT=127.0.0.1:29479 python3 python/tests/stock_nixl_agent.py decode 1048576 5 <$D/b.in >$D/b.out 2>/dev/null &
B=$!
exec 8>$D/b.in
until [ -s $D/a.out ] && [ -s $D/b.out ]; do sleep 0.05; done
echo "prefill: $(head -1 $D/a.out)"
echo "decode:  $(head -1 $D/b.out)"
ADDR=$(python3 -c "import json;print(json.loads(open('$D/a.out').readline())['addr'])")
cmd() { # agent fd outfile command
  local n=$(wc -l <$3); echo "$4" >&$2; until [ $(wc -l <$3) -gt $n ]; do sleep 0.02; done
  echo "$1> $4"; echo "   $(tail -1 $3)"; }
say "# each agent: send_local_metadata(), then fetch_remote_metadata(peer) + check_remote_metadata(peer)"
cmd prefill 7 $D/a.out "publish"
cmd decode 8 $D/b.out "publish"
cmd decode 8 $D/b.out "fetch prefill"
cmd decode 8 $D/b.out "check prefill 20"
cmd prefill 7 $D/a.out "fetch decode"
cmd prefill 7 $D/a.out "check decode 20"
say "# decode READs 1 MiB of prefill's registered memory and checks every byte"
cmd decode 8 $D/b.out "read prefill $ADDR 1048576 3"
say "etcdctl --endpoints $E get --prefix /nixl/agents/ -w fields | grep -E 'Key|Lease'"
etcdctl --endpoints $E get --prefix /nixl/agents/ -w fields | grep -E '"Key"|"Lease"'
L=$(etcdctl --endpoints $E get /nixl/agents//prefill/metadata -w json | python3 -c "import json,sys;print(format(json.load(sys.stdin)['kvs'][0]['lease'],'x'))")
say "etcdctl --endpoints $E lease timetolive $L --keys"
etcdctl --endpoints $E lease timetolive $L --keys
say "VLLM_NIXL_ETCD_ENDPOINTS=$E nixl-etcd list --nixl"
VLLM_NIXL_ETCD_ENDPOINTS=$E target/release/nixl-etcd list --nixl
say "kill -9 $A   # SIGKILL the prefill agent's process"
etcdctl --endpoints $E watch --prefix /nixl/agents//prefill/ | while read -r l; do echo "$(date +%s.%N) $l"; done >$D/watch.out &
WATCH=$!
sleep 1   # the watch is armed
T0=$(date +%s.%N)
kill -9 $A
until [ -z "$(etcdctl --endpoints $E get --prefix /nixl/agents//prefill/ --keys-only)" ]; do sleep 0.005; done
T1=$(awk '/DELETE/ {print $1; exit}' $D/watch.out)
kill $WATCH 2>/dev/null
say "etcdctl --endpoints $E get --prefix /nixl/agents/ --keys-only"
etcdctl --endpoints $E get --prefix /nixl/agents/ --keys-only | grep -v '^$'
echo "# an etcdctl watch on /nixl/agents//prefill/ saw the DELETEs $(python3 -c "print('%.0f' % (($T1-$T0)*1000))") ms after the SIGKILL; decode's keys stay"
say "# the store's log (stderr)"
cat $D/serve.err
say "kill -TERM $SERVE   # stop the store: every remaining lease is revoked"
kill -TERM $SERVE; wait $SERVE; echo "exit status $?"
tail -1 $D/serve.out
say "etcdctl --endpoints $E get --prefix /nixl/agents/ --keys-only"
etcdctl --endpoints $E get --prefix /nixl/agents/ --keys-only | grep -v '^$'; echo "(no keys)"
exec 7>&- 8>&-
kill $B 2>/dev/null; wait $B 2>/dev/null
kill $ETCD; wait $ETCD 2>/dev/null
rm -rf $D
