"""The control socket's front end: JSON-RPC 2.0, one JSON object per line.

`protocol` (pure wire types) < `handlers` (wire -> core values -> service) < `server` (the
socket); `client` is the synchronous client agentctl and the tests use.
"""
