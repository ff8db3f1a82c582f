"""http(s) media reads that go where the URL rules said they may (batch job and online server).

A host checked once and fetched after a second lookup can be re-pointed in between (DNS
rebinding: a public address for the check, 127.0.0.1 for the fetch). Here the lookup that the
connection uses is the check: aiohttp connects to the addresses our resolver returns, and it
returns them only when every one is public (pipeline.io.urls.is_public_address). Redirects are not
followed (a public host answering 302 must not send us to an internal address), and connect and
read have timeouts. Reads go through fsspec's HTTPFileSystem (ranged, seekable).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class AddressRejected(PermissionError):
    """The host resolves to (or is) an address that is not public, or answered with a redirect."""


def _check_addresses(host: str, addresses: list[str]) -> None:
    from pipeline.io import urls

    blocked = sorted({a for a in addresses if not urls.is_public_address(a)})
    if blocked:
        raise AddressRejected(f"host {host!r} resolves to a non-public address ({', '.join(blocked)}); not fetched")


def _resolver():
    from aiohttp import ThreadedResolver
    from aiohttp.abc import AbstractResolver

    class PublicResolver(AbstractResolver):
        """aiohttp's own lookup, answered only when every address is public."""

        def __init__(self):
            self._lookup = ThreadedResolver()

        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
            infos = await self._lookup.resolve(host, port, family)
            _check_addresses(host, [info["host"] for info in infos])
            return infos

        async def close(self) -> None:
            await self._lookup.close()

    return PublicResolver()


async def _refuse_redirects(response) -> None:
    if 300 <= response.status < 400:
        raise AddressRejected(f"{response.url} answered {response.status} (a redirect to "
                              f"{response.headers.get('Location')!r}); redirects are not followed")


async def pinned_client(loop=None, connect_timeout_s: float = 10.0, read_timeout_s: float = 30.0):
    """The aiohttp session for fsspec's HTTPFileSystem (its `get_client`)."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=_resolver()), trust_env=False,  # no proxy from the environment
        timeout=aiohttp.ClientTimeout(sock_connect=connect_timeout_s, sock_read=read_timeout_s),
        raise_for_status=_refuse_redirects)


def open_http(url: str, connect_timeout_s: float, read_timeout_s: float):
    from fsspec.implementations.http import HTTPFileSystem

    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
        _check_addresses(host, [host])  # aiohttp does not resolve an address literal
    except ValueError:
        pass
    fs = HTTPFileSystem(get_client=pinned_client, allow_redirects=False,
                        client_kwargs={"connect_timeout_s": connect_timeout_s, "read_timeout_s": read_timeout_s})
    return fs.open(url, "rb")
