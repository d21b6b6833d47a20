"""The pure core: decisions without I/O (no trio, pyroute2, sqlite3, subprocess, socket, os)."""
