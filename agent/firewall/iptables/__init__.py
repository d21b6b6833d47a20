"""The iptables backend: the agent's chains, programmed with iptables-restore.

Layout (pure modules first; importing the package imports none of them):
    serialize.py  iptables-restore text of a transaction (pure twin of `_fast/serialize.pyx`)
    save.py       iptables-save parsed, drift against a ruleset (pure)
    restore.py    iptables-restore/-save processes: spare process, answer at commit, timeouts
    applier.py    one family's chains: setup, diff transactions, rollback of partial commits
"""
