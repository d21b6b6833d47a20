"""Firewall backends: apply the rulesets `agent.core.rules` renders (iptables-restore today).

Importing this package imports no backend (`agent.accel` loads the pure serialiser twin from
`agent.firewall.iptables` early).
"""
