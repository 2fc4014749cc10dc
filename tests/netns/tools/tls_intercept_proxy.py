"""TEST STAND-IN for a TLS-inspecting egress proxy (never used outside the tests).

    python tls_intercept_proxy.py LISTEN_HOST LISTEN_PORT

Answers CONNECT with 200, then terminates the client's TLS itself with a certificate from its
own throwaway CA (as an inspecting proxy does), and relays the decrypted bytes to the real
target over a second TLS connection it does not verify. A faithful relay: the authority's
answers (its CA included) reach the client untouched; only the certificate on the wire is not
the authority's. Prints "ready" when listening, and one "CONNECT host:port" line per tunnel.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _server_context() -> ssl.SSLContext:
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Inspecting Proxy CA (test)")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intercepted")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    tmp = Path(tempfile.mkdtemp(prefix="mitm-"))
    (tmp / "cert.pem").write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    )
    (tmp / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    return ctx


SERVER = _server_context()
UPSTREAM = ssl.create_default_context()
UPSTREAM.check_hostname = False
UPSTREAM.verify_mode = ssl.CERT_NONE  # a stand-in: it relays whatever the target is


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def _client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        print(f"CONNECT {target}", flush=True)
        host, _, port = target.rpartition(":")
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await writer.start_tls(SERVER)  # the inspection: our certificate, not the target's
        up_reader, up_writer = await asyncio.open_connection(
            host.strip("[]"), int(port), ssl=UPSTREAM, server_hostname=host.strip("[]")
        )
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    except (OSError, ssl.SSLError, ValueError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main(host: str, port: int) -> None:
    server = await asyncio.start_server(_client, host, port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
