"""A TLS handshake between two contexts over memory BIOs, in one process: no sockets, no loop."""

from __future__ import annotations

import ssl

from agent.proxy.session_offer import KeptSession


def handshake(
    client: ssl.SSLContext,
    server: ssl.SSLContext,
    server_hostname: str | None,
    session: ssl.SSLSession | None = None,
    kept: KeptSession | None = None,
    read_ticket: bool = False,
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """(client side, server side) once both finished the handshake; `session` is offered by
    CPython, `kept` as the proxy offers it. `read_ticket`: then one record from the server,
    which brings the client the server's ticket (else the connection ends with the handshake)."""
    ci, co, si, so = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(ci, co, server_side=False, server_hostname=server_hostname, session=session)
    if kept is not None:
        kept.offer(c)
    s = server.wrap_bio(si, so, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, (obj, out, into) in enumerate(((c, co, si), (s, so, ci))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            into.write(out.read())
        if all(done):
            break
    assert all(done), "the handshake did not finish"
    if read_ticket:
        s.write(b"x")
        ci.write(so.read())
        assert c.read(1) == b"x"
    return c, s
