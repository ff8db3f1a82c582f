"""URL rules for media that a client names (online server): no path into the server's own network.

A client-supplied URI is only fetched when its scheme is allowed and, for anything but an inline
`data:` URI, it starts with an operator-configured prefix. http(s) hosts are resolved and every
address they resolve to must be public: loopback, private, link-local (cloud metadata at
169.254.169.254 / fd00:ec2::254), shared, reserved and multicast addresses are refused.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

# Never fetched, whatever the configuration: local files and FFmpeg/fsspec protocols that read them.
FORBIDDEN_SCHEMES = frozenset({"file", "local", "concat", "subfile", "pipe", "fd", "memory", "cache",
                               "filecache", "simplecache", "blockcache", "zip", "tar"})


# fsspec chains URLs with "::" anywhere (simplecache::s3://..., s3://a::local-path); a bracketed
# IPv6 host ([::1]) is the only "::" allowed.
_IPV6_HOST = re.compile(r"^[A-Za-z][\w+.-]*://\[[0-9A-Fa-f:.%]*\]")
_CONTROL = "[\x00-\x1f\x7f]"
_CONTROL_RE = re.compile(_CONTROL)  # one regex search, not a Python loop per character: the scan calls it per row


class URLRejected(ValueError):
    """The URI may not be fetched; the message says which rule refused it."""


def _addresses(host: str, resolve: Callable) -> set[str]:
    try:
        return {info[4][0] for info in resolve(host, None, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError) as e:
        raise URLRejected(f"host {host!r} does not resolve ({e})") from e


# IPv6 forms that carry an IPv4 address in their last 32 bits (ipaddress knows mapped, 6to4 and
# Teredo itself): the well-known NAT64 prefix (RFC 6052), SIIT's IPv4-translated addresses (RFC 2765).
_V4_IN_LOW_BITS = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::ffff:0:0:0/96"))
# Never public: IPv4-compatible addresses (deprecated, ::a.b.c.d) and the local-use NAT64 prefix
# (RFC 8215), which an operator's translator maps to whatever IPv4 it chooses, internal ones included.
_V6_NEVER_PUBLIC = (ipaddress.ip_network("::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found = [v4 for v4 in (ip.ipv4_mapped, ip.sixtofour) if v4] + list(ip.teredo or ())
    if any(ip in net for net in _V4_IN_LOW_BITS):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_public_address(address: str) -> bool:
    """A globally routable unicast address; an IPv6 address that embeds an IPv4 address (mapped,
    NAT64, 6to4, Teredo, translated) only when that IPv4 address is public too."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _V6_NEVER_PUBLIC):
            return False
        embedded = _embedded_ipv4(ip)
        if embedded:
            return all(v4.is_global and not v4.is_multicast for v4 in embedded)
    return ip.is_global and not ip.is_multicast


def _split(uri: str):
    """urlsplit, with malformed URIs (NUL and other control characters, an unbalanced '[') refused
    as URLRejected instead of the ValueError that would end the run or answer 500."""
    if _CONTROL_RE.search(uri):
        raise URLRejected("the URI holds a control character (NUL, newline, ...); fix the URI")
    try:
        parts = urlsplit(uri)
        parts.hostname, parts.port  # noqa: B018 - parsing these raises on a malformed host or port
    except ValueError as e:
        raise URLRejected(f"the URI is malformed ({e}); fix the URI") from e
    return parts


def check_uri(uri: str, allowed_schemes: Iterable[str], allowed_prefixes: Iterable[str],
              resolve: Callable = socket.getaddrinfo) -> str:
    """Return the URI's scheme if it may be fetched, else raise URLRejected with the reason."""
    if not uri.startswith("data:") and "::" in _IPV6_HOST.sub("", uri):
        raise URLRejected("chained URLs (a::b) are not allowed")
    parts = _split(uri) if not uri.startswith("data:") else urlsplit(uri)
    scheme = parts.scheme.lower() if ":" in uri else ""
    if not scheme:
        raise URLRejected("a URL with a scheme is required (data:, or an allowed object-store or https prefix)")
    allowed = {s.lower() for s in allowed_schemes}
    if scheme in FORBIDDEN_SCHEMES or scheme not in allowed:
        raise URLRejected(f"scheme {scheme}: is not allowed (allowed: {', '.join(sorted(allowed)) or 'none'})")
    if scheme == "data":
        return scheme
    # "s3://bucket" must not admit "s3://bucket-other/": a prefix naming a host or bucket ends at "/".
    prefixes = [p if p.endswith("/") or p.endswith("://") else p + "/" for p in allowed_prefixes]
    if not any(uri.startswith(p) for p in prefixes):
        raise URLRejected(f"the URL is not under an allowed prefix ({', '.join(prefixes) or 'none'})")
    if scheme in ("http", "https"):
        if parts.username or parts.password:
            raise URLRejected("URLs with credentials are not allowed")
        host = parts.hostname or ""
        blocked = sorted(a for a in _addresses(host, resolve) if not is_public_address(a))
        if not host or blocked:
            raise URLRejected(f"host {host!r} resolves to a non-public address ({', '.join(blocked) or 'none'})")
    return scheme


def media_prefixes(allowed: list[str], manifest: str) -> list[str]:
    """Where a run's media may be: the prefixes given (--allow-uri-prefix), else the manifest's own store."""
    return list(allowed) or default_media_prefixes(manifest)


def default_media_prefixes(manifest: str) -> list[str]:
    """The manifest's own store: its bucket (s3://bucket/), or for a local manifest its folder."""
    import os

    if "://" in manifest and not manifest.startswith("file://"):
        scheme, rest = manifest.split("://", 1)
        return [f"{scheme}://{rest.split('/', 1)[0]}/"]
    path = os.path.realpath(manifest.removeprefix("file://"))
    return [(path if os.path.isdir(path) else os.path.dirname(path)).rstrip("/") + "/"]


def check_media_uri(uri: str, allowed_prefixes: Iterable[str], resolve: Callable = socket.getaddrinfo) -> None:
    """Raise URLRejected unless a manifest's media URI is under an allowed prefix (batch jobs).

    Local paths (plain or file://) must be absolute and, with symlinks and `..` resolved, lie under
    an allowed local folder; other URIs go through check_uri (scheme, prefix, public http hosts).
    """
    import os

    prefixes = tuple(allowed_prefixes)
    local_roots = _local_roots(prefixes)
    parts = _split(uri)
    scheme = parts.scheme.lower() if ":" in uri else ""
    if scheme in ("", "file"):
        if "::" in uri:
            raise URLRejected("chained URLs (a::b) are not allowed")
        path = uri.removeprefix("file://")
        if not os.path.isabs(path):
            raise URLRejected("local paths must be absolute")
        if not _under_local_root(path, local_roots):
            raise URLRejected(f"the local path is outside the allowed folders ({', '.join(local_roots) or 'none'})")
        return
    remote = [p for p in prefixes if "://" in p and not p.startswith("file://")]
    check_uri(uri, {p.split("://", 1)[0] for p in remote}, remote, resolve)


def _under_local_root(path: str, roots: list[str]) -> bool:
    """The path, symlinks and `..` resolved, lies under a root. The folder's real path is looked up
    once per folder (a manifest names millions of files in few folders); the file itself is
    checked each time. A folder swapped for a link later is refused where the file is opened
    (open_local_checked)."""
    import os

    folder, name = os.path.split(path)
    if name in ("", ".", "..") or os.path.islink(path):
        real = os.path.realpath(path)
    else:
        real = os.path.join(_real_folder(folder), name)
    return any(real.startswith(root) for root in roots)


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    import os

    return os.path.realpath(folder)


def media_uris_surely_allowed(uris, allowed_prefixes: Iterable[str]):
    """A boolean numpy mask over a pyarrow string array: True where check_media_uri accepts the URI
    for certain, decided for the whole array at once (the manifest scan's fast path). Only plain
    cases pass: no control character and no "::", and either under a remote prefix that names its
    host (not http(s): those need a DNS lookup) or an absolute local path without `.`/`..`/`//`
    that the folder check admits. Everything else goes through check_media_uri one by one, which
    also words the reason."""
    import numpy as np
    import pyarrow.compute as pc

    prefixes = tuple(allowed_prefixes)
    n = len(uris)
    plain = pc.invert(pc.or_(pc.match_substring_regex(uris, _CONTROL), pc.match_substring(uris, "::")))
    plain = pc.fill_null(plain, False)
    sure = np.zeros(n, dtype=bool)
    for prefix in _host_prefixes(prefixes):
        sure |= pc.fill_null(pc.and_(plain, pc.starts_with(uris, prefix)), False).to_numpy(zero_copy_only=False)
    roots = _local_roots(prefixes)
    if roots:
        paths = pc.if_else(pc.starts_with(uris, "file://"), pc.utf8_slice_codeunits(uris, 7), uris)
        local = pc.and_(plain, pc.or_(pc.starts_with(uris, "/"), pc.starts_with(uris, "file:///")))
        local = pc.and_(local, pc.invert(pc.match_substring_regex(paths, r"//|/\.\.?(/|$)")))
        local = pc.fill_null(local, False).to_numpy(zero_copy_only=False)
        todo = np.flatnonzero(local & ~sure)
        for i, path in zip(todo, pc.take(paths, todo).to_pylist()):
            sure[i] = _under_local_root(path, roots)
    return sure


@functools.lru_cache(maxsize=32)
def _host_prefixes(prefixes: tuple[str, ...]) -> list[str]:
    """The allowed remote prefixes that fix the URI's scheme and host (s3://bucket/...), not
    http(s), that check_media_uri itself admits: a URI under one needs no per-URI parsing."""
    out = []
    for p in prefixes:
        p = p if p.endswith("/") else p + "/"
        scheme, sep, rest = p.partition("://")
        if not sep or scheme.lower() in ("http", "https", "file") or not rest.split("/", 1)[0]:
            continue
        try:
            check_media_uri(p + "x", prefixes, resolve=lambda *a, **k: [])
        except URLRejected:
            continue
        out.append(p)
    return out


@functools.lru_cache(maxsize=32)
def _local_roots(prefixes: tuple[str, ...]) -> list[str]:
    """The allowed local folders, symlinks resolved: once per prefix list, not once per manifest row."""
    import os

    return [os.path.realpath(p.removeprefix("file://")).rstrip("/") + "/"
            for p in prefixes if p.startswith(("/", "file://"))]


def open_local_checked(path: str, allowed_prefixes: Iterable[str]):
    """Open a local media file for reading and check the file that was opened, not the name: a
    symlink swapped after check_media_uri (on the driver) cannot lead the worker outside the
    allowed folders. Raises URLRejected (the file is closed again) when the opened file is outside."""
    import os

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        proc_link = f"/proc/self/fd/{fd}"
        if os.path.islink(proc_link):  # Linux: the path of the open file itself
            opened = os.readlink(proc_link)
        else:  # elsewhere: the resolved name must still be the very file that was opened
            opened = os.path.realpath(path)
            if not os.path.samestat(os.fstat(fd), os.stat(opened)):
                raise URLRejected("the file changed while it was opened")
        check_media_uri(opened, allowed_prefixes)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")
