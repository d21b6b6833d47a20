"""The CNI plugin front end: Podman, containerd, CRI-O and Kubernetes drive agentd.

A runtime runs the plugin executable `netagent` (`_fast/cni/netagent.c`, built at install, or
its pure-Python twin `plugin`) per call. The executable is a thin client: it answers VERSION
itself and forwards everything else, unread, as one `cni.exec` JSON-RPC request to agentd,
then prints agentd's answer and exits with its status. All CNI logic lives here, in agentd:
`spec` (pure: the call read into values, results and errors built) and `commands` (the
service called).
"""
