"""Cluster names on the host: a DNS stub that answers `<svc>.<ns>.svc.<cluster-domain>` from the
catalog and forwards every other query, unchanged, to the host's own resolvers.

    message.py    sans-IO codec: parse a query's header, first question, OPT; build answers
    names.py      the name table (ServiceAddress list -> what the stub owns)
    stub.py       the decision for one message, and the per-source rate limit (pure)
    upstreams.py  the host's resolvers from resolv.conf (read, never written)
    server.py     the asyncio UDP+TCP shell
    service.py    the stub as `meshagent run` runs it: start, redirect (agent/intercept/dns_rules.py),
                  heartbeat, names from the directory, stop, status and metrics
"""
