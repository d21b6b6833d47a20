"""netagent: Docker-style bridge networking for network namespaces.

Layers, innermost first (an inner layer never imports an outer one):

- `agent.core`      pure: model, IPAM, naming, ruleset rendering, errors. No I/O.
- `agent.api.protocol`  pure: the JSON-RPC wire types (msgspec).
- shells            `agent.kernel` (netlink), `agent.firewall` (iptables-restore),
                    `agent.store` (sqlite3), `agent.api.server` (Unix socket).
- `agent.service`   every change goes through it: core decisions, shell actions, rollback.
- `agent.daemon`    process wiring (agentd); `agent.cli` is agentctl (client only).
"""

__version__ = "0.1.0"
