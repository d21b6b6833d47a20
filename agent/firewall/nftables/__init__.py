"""The nftables backend: one `inet netagent` table of fixed chains, dispatch through hash sets.

Layout (each module's header says more):
    render.py     Policy -> the table's `State` (pure): chains, set and map elements; `Incremental`
    script.py     nft scripts between States (`diff`, `full`), the listing parsed back (pure)
    transport.py  libnftables in process (ctypes) or the `nft` tool: one script, one transaction
    coexist.py    the marked accept in iptables FORWARD; the other backend's leftovers
    backend.py    `NftablesFirewall`: the `agent.firewall.base.Firewall` of this backend
"""
