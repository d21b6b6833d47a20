"""The control API: wire types (`protocol`, pure), the Trio server and the sync client."""
