"""The kernel shell: netlink (links, addresses, routes) and network namespaces.

Layering, in agentd: `base` (the protocols) < `jobs` (job names, argument shapes, framing) <
`connection` (spawns the worker, sends jobs) < `client` (the `Kernel` API, `open_kernel`).
In the worker process: `threads` (throwaway namespace threads) < `rtnl` (lean rtnetlink
messages) < `netns` (namespace files, fork-free sockets inside, namespace ids) < `sysctl`,
`dumps` < `ops` (the jobs themselves, and their table) < `worker` (the process). The two sides
share only `jobs` and `base`; nothing imports upward. These are the only modules that use
setns or rtnetlink sockets (the event readers in `events` and `firewall.monitor` open their
own).
"""
