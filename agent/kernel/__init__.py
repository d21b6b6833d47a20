"""The kernel shell: netlink (links, addresses, routes) and network namespaces.

Layering: `threads` (throwaway threads, awaited from Trio) < `rtnl` (lean prebuilt rtnetlink
messages) < `netns` (namespace files, fork-free sockets inside) < `links` (the `Kernel` API).
These are the only modules that use setns or rtnetlink sockets (the event readers in `events`
and `firewall.monitor` open their own).
"""
