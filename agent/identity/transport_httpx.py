"""The enroll and renew processes' transport: httpx, through the proxy transport.py chose.

Short-lived processes only: the daemon keeps the standard-library transport (transport.py) and
never imports this module (its idle memory goal). httpx's own environment handling is off
(trust_env=False) so that the config key, --https-proxy and no_proxy decide, the same way as
for the daemon; CONNECT, the pin and TLS end to end are as in transport.request.
"""

from __future__ import annotations

import re
import ssl
from urllib.parse import urlsplit

import httpx

from . import transport
from .transport import (
    DIRECT,
    ProxyConfig,
    Response,
    not_the_authority,
    proxy_refused,
    proxy_unreachable,
    unreachable,
)

_STATUS = re.compile(r"(\d{3})\s*(.*)")


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # httpx -> httpcore -> ssl: a short chain
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def request(
    url: str,
    context: ssl.SSLContext,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    timeout: float,
    proxy: ProxyConfig = DIRECT,
) -> Response:
    """One HTTPS request with httpx; failures become the errors transport.request raises."""
    via = proxy.for_url(url)
    if via is not None and ":" in (urlsplit(url).hostname or ""):
        # httpcore writes `CONNECT fd00::1:8443`, without the brackets RFC 9110 requires, which
        # proxies refuse or misread: an IPv6 authority goes through the standard library's
        # tunnel, which brackets it.
        return transport.request(url, context, method, path, body, headers, timeout, proxy)
    client = httpx.Client(verify=context, proxy=via.url if via else None, trust_env=False, timeout=timeout)
    # A CONNECT that fails before any byte to the proxy is the proxy's fault; after the tunnel
    # is up, the authority's. httpx raises ConnectError for both: the ssl cause tells them apart.
    try:
        with client:
            response = client.request(method, url.rstrip("/") + path, content=body, headers=headers)
            return Response(
                response.status_code, response.content, {k.lower(): v for k, v in response.headers.items()}
            )
    except httpx.ProxyError as exc:
        assert via is not None
        match = _STATUS.match(str(exc))
        if match:
            raise proxy_refused(via, url, int(match.group(1)), match.group(2)) from None
        raise proxy_unreachable(via, url, str(exc) or exc.__class__.__name__) from None
    except httpx.HTTPError as exc:
        if _caused_by(exc, ssl.SSLCertVerificationError):
            raise not_the_authority(url, via) from None
        connecting = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
        if via is not None and connecting and not _caused_by(exc, ssl.SSLError):
            raise proxy_unreachable(via, url, str(exc) or exc.__class__.__name__) from None
        raise unreachable(url, exc) from None
