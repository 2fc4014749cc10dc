# The certificate-chain verification cache (verify_cache.pyx), as the type checker sees it.
import ssl

ATTRIBUTE: str

class VerifyCache:
    def stats(self) -> dict[str, int]: ...

def install(ctx: ssl.SSLContext) -> VerifyCache | None: ...
def cache_of(ctx: ssl.SSLContext) -> VerifyCache | None: ...
