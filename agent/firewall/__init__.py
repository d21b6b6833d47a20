"""Firewall backends: apply the rulesets `agent.core.rules` renders (iptables-restore today)."""

from agent.firewall.iptables import IptablesFirewall

__all__ = ["IptablesFirewall"]
