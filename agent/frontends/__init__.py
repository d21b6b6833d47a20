"""Front ends: each converts its wire format to core values at its edge and calls the service.

- `jsonrpc`  the control socket (JSON-RPC 2.0 lines): protocol, server, handlers, client
- `cli`      agentctl, the command-line client of the control socket

None of them decides anything: validation and decisions are the core's (`agent.core.plan`,
`agent.core.options`), effects the service's. The CNI plugin and the Docker network plugin
take their places here.
"""
