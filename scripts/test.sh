#!/usr/bin/env bash
# Install everything, then run the whole test suite inside a private network + mount namespace
# (unshare -n -m, tmpfs on /run/netns and /etc/netns): no test ever touches the host's own
# network, nor leaves a namespace's resolv.conf behind.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
.venv/bin/ruff check agent tests bench
.venv/bin/ruff format --check agent tests bench
.venv/bin/mypy
mkdir -p /run/netns /etc/netns
# the kernel-test guard (tests/conftest.py) checks that tests run outside this namespace
export NETAGENT_HOST_NETNS=$(readlink /proc/self/ns/net)
exec unshare --net --mount --propagation private -- sh -c '
  mount -t tmpfs netagent-test /run/netns &&
  mount -t tmpfs netagent-test /etc/netns &&
  ip link set lo up &&
  exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"' sh "$@"
