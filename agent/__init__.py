"""netagent: Docker-style bridge networking for network namespaces.

Layers, innermost first (an inner layer never imports an outer one; tests/core/test_layering.py
checks it, and docs/layers.svg draws it):

- `agent.core`        pure: model, topology, decisions (options, plan, policy, attach), IPAM,
                      naming, errors, netlink decoders. No I/O.
- `agent.log`, `agent.accel`   structlog set-up; Cython extensions or their pure twins.
- shells              `agent.kernel` (netlink, namespaces, the kernel worker), `agent.firewall`
                      (backends behind `firewall.base.Firewall`), `agent.store` (sqlite3).
- `agent.service`     every change goes through it: core decisions, shell actions, rollback.
- `agent.frontends`   wire formats to core values: `jsonrpc` (the control socket), `cli`
                      (agentctl, a client only).
- `agent.daemon`      process wiring (agentd).
"""

__version__ = "0.1.0"
