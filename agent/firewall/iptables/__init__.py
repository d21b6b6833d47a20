"""The iptables backend: the agent's chains, programmed with iptables-restore.

Layout (pure modules first; importing the package imports none of them):
    rules.py        the renderer: one family's policy -> a `Ruleset` (pure)
    transaction.py  `diff` and `full`: the restore `Script` between two rulesets (pure)
    serialize.py    iptables-restore text of a script (pure twin of `_fast/serialize.pyx`)
    save.py         iptables-save parsed, drift against a ruleset (pure)
    restore.py      iptables-restore/-save processes: spare process, answer at commit, timeouts
    applier.py      one family's chains: setup, diff transactions, rollback of partial commits
    backend.py      `IptablesFirewall`, the `Firewall`: dual stack, ports' side effects, drift
"""
