#!/usr/bin/env bash
# Install netagent, then show its main job in a throwaway network namespace: agentd starts,
# and agentctl walks through what Docker does when a network is created and containers join it.
# Nothing here touches the host's own network (unshare -n -m, tmpfs on /run/netns and /etc/netns).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
mkdir -p /run/netns /etc/netns
exec unshare --net --mount --propagation private -- bash -c '
set -euo pipefail
mount -t tmpfs netagent-demo /run/netns
mount -t tmpfs netagent-demo /etc/netns
ip link set lo up
dir=$(mktemp -d /tmp/netagent-demo.XXXXXX)
export NETAGENT_SOCKET=$dir/agent.sock PATH=$PWD/.venv/bin:$PATH
step() { printf "\n\033[1m$ %s\033[0m\n" "$*"; "$@"; }
agentd --state-dir "$dir/state" --log-format console --log-level warning 2>"$dir/agentd.log" &
agentd_pid=$!
trap "kill $agentd_pid 2>/dev/null; wait $agentd_pid 2>/dev/null || true" EXIT
for _ in $(seq 100); do agentctl info >/dev/null 2>&1 && break; sleep 0.05; done
step agentctl info
step agentctl network ls
step ip -br addr show netagent0
step agentctl network create test1
step agentctl network inspect test1
step agentctl run --network test1 c1
step agentctl run --network test1 c2
step agentctl run c3
step agentctl ps
step ip netns exec c1 ip -br addr show eth0
step ip netns exec c1 ip route
step ip netns exec c1 ping -c1 -W1 172.18.0.3
echo "# c3 (network bridge) cannot reach c1 (network test1): isolation"
step bash -c "ip netns exec c3 ping -c1 -W1 172.18.0.2 || echo \"-> blocked, as expected\""
step agentctl ruleset
step agentctl rm c1 c2 c3
step agentctl network rm test1
step agentctl network ls
echo; echo "demo done: agentd log in $dir/agentd.log"
'
