#!/usr/bin/env bash
# Install what netagent needs on a fresh Debian machine (root): apt packages, a venv in .venv,
# and the package itself with its Cython extensions built in place.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_pkgs=(iproute2 iptables iputils-ping conntrack python3-venv python3-dev gcc util-linux
          containernetworking-plugins netavark docker.io podman busybox-static dnsutils
          dnsperf aardvark-dns systemd curl strace
          nftables libnftables1 iperf3)  # nftables backend (nft, libnftables.so.1); bench_dataplane
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "+ apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# compat mode: a plain path entry instead of the editable finder (which costs every agentctl
# start ~13 ms of imports); the Cython extensions are built in place either way
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]" \
  --config-settings editable_mode=compat 2>&1 \
  | grep -v -E "^WARNING: Location .* is ignored" || true
# the CNI plugin executable (a thin C client of agentd); without a compiler, `agentctl cni
# install` writes a launcher of its Python twin instead (agent/frontends/cni/plugin.py);
# static where libc.a exists: exec without the dynamic loader, ~0.5 ms less a call
if command -v "${CC:-gcc}" >/dev/null 2>&1; then
  { "${CC:-gcc}" -O2 -Wall -Wextra -static -o _fast/cni/netagent.tmp _fast/cni/netagent.c \
      2>/dev/null \
    || "${CC:-gcc}" -O2 -Wall -Wextra -o _fast/cni/netagent.tmp _fast/cni/netagent.c; } \
    && mv _fast/cni/netagent.tmp _fast/cni/netagent
fi
# bytecode written now, so that agentctl starts fast even where PYTHONDONTWRITEBYTECODE is set
.venv/bin/python -m compileall -q agent _fast >/dev/null
.venv/bin/python -c "import agent.accel as a; print('+ netagent installed; Cython extensions:', 'yes' if a.ACCELERATED else 'NO (pure twins)')"
