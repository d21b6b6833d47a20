"""Docker's network and IPAM plugin protocol (libnetwork's remote driver): `agentd
--docker-plugin PATH`.

`wire` (the request bodies, msgspec types), `convert` (wire values to core values, pure),
`handlers` (one coroutine per endpoint, calling the service), `server` (HTTP/1.1 on a Unix
socket with h11, in the Trio loop).
"""
