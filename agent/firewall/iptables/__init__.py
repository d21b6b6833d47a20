"""The iptables backend: the agent's chains, programmed with iptables-restore.

Layout (pure modules first):
    save.py     iptables-save parsed, drift against a ruleset (pure)
    restore.py  iptables-restore/-save processes: spare process, answer at commit, timeouts
    applier.py  one family's chains: setup, diff transactions, rollback of partial commits
"""

from agent.firewall.iptables.applier import IptablesFirewall

__all__ = ["IptablesFirewall"]
