"""agentd's embedded DNS server: names per network on the gateways (`server`), forwarding
to the host's resolvers (`upstream`), the wire format through dnslib (`wire`)."""
