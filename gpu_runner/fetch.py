"""Fetching untrusted URLs without becoming a proxy into the private network.

Used for `data_url` / `image_urls` (runner) and for webhook targets
(service). No torch, no `service` imports: both processes use it.

The defences, and why each is needed:

- `check_url` accepts only `http`/`https` URLs without user info, odd
  characters or ambiguous numeric hosts (`0x7f.1`, `2130706433`), and checks
  an IP-literal host right away — aiohttp never asks the resolver about IP
  literals, so this is the only place they are checked.
- `PublicOnlyResolver` checks every address a host name resolves to, on
  every resolution, and hands aiohttp only checked addresses: the connection
  goes to the address that was checked (no DNS-rebinding window between
  check and connect). A name with any disallowed address is refused as a
  whole, since mixing public and private answers is a rebinding trick.
- `fetch_to_file` follows redirects itself (at most `max_redirects`), so
  each hop passes `check_url` and the resolver again; streams to a
  temporary file with a byte cap enforced as data arrives (the declared
  `Content-Length` only allows an earlier refusal); runs under one overall
  deadline; asks for `identity` encoding and refuses compressed bodies, so a
  gzip bomb cannot expand behind the cap; ignores proxy environment
  variables (a proxy would resolve names where we cannot check them).

A session for other requests (webhooks) gets the same protection from
`public_connector()` plus `check_url` on the URL, with redirects off.

`allow_private` (config `network.allow_private_urls`) lifts the ban on
loopback, RFC 1918 / ULA private, link-local, CGNAT and similar ranges for
LAN deployments and tests. Cloud metadata endpoints, unspecified, multicast,
broadcast, reserved and documentation addresses stay refused regardless:
nothing legitimate is ever downloaded from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import re
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from gpu_runner.errors import RunnerError

__all__ = [
    "DEFAULT_MAX_REDIRECTS",
    "FetchError",
    "FetchResult",
    "IPAddress",
    "IPNetwork",
    "PublicOnlyResolver",
    "address_block_reason",
    "check_url",
    "fetch_to_file",
    "public_connector",
    "resolve_public",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_MAX_REDIRECTS = 5
_MAX_URL_LENGTH = 4096
_CHUNK = 64 * 1024
_USER_AGENT = "boothd-fetch/0.1"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Labels inet_aton() would read as numbers (decimal, octal, hex): a host made
# only of those is an IP address in disguise ("0x7f.1" is 127.0.0.1).
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


class FetchError(RunnerError):
    """A URL could not be fetched.

    Codes: `url_not_allowed` (scheme, user info, or an address that is not
    public), `download_too_large`, `download_failed` (network error, HTTP
    error status, too many redirects), `download_timeout`.
    """


@dataclass(frozen=True, slots=True)
class FetchResult:
    """A completed download: where it is, its size, SHA-256 and media type."""

    path: Path
    bytes: int
    sha256: str
    content_type: str | None


# --------------------------------------------------------------------------- #
# Address policy
# --------------------------------------------------------------------------- #

# (network, reason, lifted by allow_private). Order matters: the first match
# names the reason, so specific entries come before the ranges holding them.
_V4_RULES: tuple[tuple[ipaddress.IPv4Network, str, bool], ...] = tuple(
    (ipaddress.IPv4Network(net), reason, relaxable)
    for net, reason, relaxable in (
        ("169.254.169.254/32", "cloud metadata service", False),
        ("169.254.170.2/32", "cloud metadata service (ECS)", False),
        ("169.254.170.23/32", "cloud metadata service (EKS pod identity)", False),
        ("168.63.129.16/32", "cloud metadata service (Azure wire server)", False),
        ("100.100.100.200/32", "cloud metadata service (Alibaba)", False),
        ("192.0.0.192/32", "cloud metadata service (Oracle)", False),
        ("0.0.0.0/8", "unspecified address", False),
        ("10.0.0.0/8", "private address", True),
        ("100.64.0.0/10", "carrier-grade NAT address", True),
        ("127.0.0.0/8", "loopback address", True),
        ("169.254.0.0/16", "link-local address", True),
        ("172.16.0.0/12", "private address", True),
        ("192.0.0.0/24", "IETF protocol assignment", False),
        ("192.0.2.0/24", "documentation address", False),
        ("192.88.99.0/24", "6to4 relay anycast address", False),
        ("192.168.0.0/16", "private address", True),
        ("198.18.0.0/15", "benchmarking address", False),
        ("198.51.100.0/24", "documentation address", False),
        ("203.0.113.0/24", "documentation address", False),
        ("224.0.0.0/4", "multicast address", False),
        ("240.0.0.0/4", "reserved address", False),
    )
)
_V6_RULES: tuple[tuple[ipaddress.IPv6Network, str, bool], ...] = tuple(
    (ipaddress.IPv6Network(net), reason, relaxable)
    for net, reason, relaxable in (
        ("fd00:ec2::254/128", "cloud metadata service", False),
        ("fd00:ec2::23/128", "cloud metadata service (EKS pod identity)", False),
        ("::/128", "unspecified address", False),
        ("::1/128", "loopback address", True),
        ("::/96", "deprecated IPv4-compatible address", False),
        ("64:ff9b:1::/48", "local-use NAT64 address", True),
        ("100::/64", "discard-only address", False),
        ("2001::/32", "Teredo tunnel address", False),
        ("2001::/23", "IETF protocol assignment", False),
        ("2001:db8::/32", "documentation address", False),
        ("3fff::/20", "documentation address", False),
        ("5f00::/16", "segment-routing address", False),
        ("fc00::/7", "unique-local (private) address", True),
        ("fe80::/10", "link-local address", True),
        ("fec0::/10", "site-local address", True),
        ("ff00::/8", "multicast address", False),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")


def _parse_address(address: str | IPAddress) -> IPAddress | None:
    if isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
        text = str(address)
    else:
        text = address.strip().strip("[]")
    # A zone ("fe80::1%eth0") says which interface, not which address.
    text = text.split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 address stands for, and the embedding's name."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped, "IPv4-mapped"
    if addr in _TRANSLATED:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF), "IPv4-translated"
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF), "NAT64"
    if addr.sixtofour is not None:
        return addr.sixtofour, "6to4"
    return None


def address_block_reason(
    address: str | IPAddress,
    *,
    allow_private: bool = False,
    allow_networks: Sequence[IPNetwork] = (),
) -> str | None:
    """Why a connection to `address` is refused, or None when it is allowed.

    `allow_private` lifts the private-range rules (see the module docstring);
    `allow_networks` are explicit exceptions (an operator's one internal file
    server). Neither lifts metadata, unspecified, multicast or reserved rules.
    IPv6 forms that embed an IPv4 address (mapped, translated, NAT64, 6to4)
    are judged by the embedded address.
    """
    addr = _parse_address(address)
    if addr is None:
        return f"{address!r} is not an IP address"
    verdict = _rule_for(addr)
    if isinstance(addr, ipaddress.IPv6Address) and verdict is None:
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            inner, how = embedded
            inner_reason = address_block_reason(
                inner, allow_private=allow_private, allow_networks=allow_networks
            )
            return None if inner_reason is None else f"{how} {inner_reason}"
    if verdict is None:
        if addr.is_global:
            return None
        # Not in our tables, yet not globally routable per the stdlib: refuse.
        verdict = ("non-global address", False)
    reason, relaxable = verdict
    if relaxable and (allow_private or any(addr in net for net in allow_networks)):
        return None
    return f"{reason} {addr}"


def _rule_for(addr: IPAddress) -> tuple[str, bool] | None:
    if isinstance(addr, ipaddress.IPv4Address):
        for net4, reason, relaxable in _V4_RULES:
            if addr in net4:
                return reason, relaxable
        return None
    for net6, reason, relaxable in _V6_RULES:
        if addr in net6:
            return reason, relaxable
    return None


# --------------------------------------------------------------------------- #
# URLs
# --------------------------------------------------------------------------- #


def _not_allowed(url: str, why: str) -> FetchError:
    shown = url if len(url) <= 200 else url[:197] + "..."
    return FetchError("url_not_allowed", f"URL {shown!r} is not allowed: {why}")


def _checked_url(url: str, allow_private: bool, allow_networks: Sequence[IPNetwork] = ()) -> URL:
    """`check_url`, returning the parsed URL that was checked."""
    if len(url) > _MAX_URL_LENGTH:
        raise _not_allowed(url, f"longer than {_MAX_URL_LENGTH} characters")
    # URL parsers disagree about whitespace, control characters and
    # backslashes; refusing them removes the disagreement.
    if any(ch <= " " or ch == "\x7f" for ch in url) or "\\" in url:
        raise _not_allowed(url, "contains whitespace, control characters or a backslash")
    try:
        parsed = URL(url)
        port = parsed.port
    except (ValueError, TypeError) as exc:
        raise _not_allowed(url, f"not a valid URL ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise _not_allowed(url, "only http and https URLs are fetched")
    authority = parsed.raw_authority or ""
    if "@" in authority or parsed.raw_user is not None or parsed.raw_password is not None:
        raise _not_allowed(url, "user info in URLs is not allowed")
    host = (parsed.raw_host or "").rstrip(".").lower()
    if not host:
        raise _not_allowed(url, "no host")
    if port is None or not 0 < port < 65536:
        raise _not_allowed(url, "invalid port")
    if "%" in host and _parse_address(host) is None:
        # Percent-escapes in a host name decode differently in different
        # layers ("%31%32%37.0.0.1"); only an IPv6 zone may carry one.
        raise _not_allowed(url, "percent-encoded host name")
    if _parse_address(host) is not None:
        reason = address_block_reason(
            host, allow_private=allow_private, allow_networks=allow_networks
        )
        if reason is not None:
            raise _not_allowed(url, reason)
    elif all(_NUMERIC_LABEL.match(label) for label in host.split(".")):
        raise _not_allowed(url, "numeric host that is not a dotted-quad IPv4 address")
    elif host in _METADATA_HOSTS:
        raise _not_allowed(url, "cloud metadata service")
    elif not allow_private and (host == "localhost" or host.endswith(".localhost")):
        raise _not_allowed(url, "localhost")
    return parsed


def check_url(url: str, allow_private: bool, *, allow_networks: Sequence[IPNetwork] = ()) -> None:
    """Raise `FetchError("url_not_allowed")` unless `url` may be fetched.

    Checks everything that can be checked without DNS; host names are
    checked again, address by address, when they are resolved.
    """
    _checked_url(url, allow_private, allow_networks)


# --------------------------------------------------------------------------- #
# Resolution
# --------------------------------------------------------------------------- #


class PublicOnlyResolver(AbstractResolver):
    """An aiohttp resolver that only ever returns allowed addresses.

    Wraps `inner` (default: aiohttp's `DefaultResolver`) and applies
    `address_block_reason` to every result of every resolution, raising
    `FetchError("url_not_allowed")` if any address is refused. Not closed by
    the connector that uses it: the owner closes it.
    """

    def __init__(
        self,
        allow_private: bool,
        *,
        allow_networks: Sequence[IPNetwork] = (),
        inner: AbstractResolver | None = None,
    ) -> None:
        self.allow_private = allow_private
        self.allow_networks = tuple(allow_networks)
        self._inner = inner
        self._owns_inner = inner is None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve `host` and refuse the lot if any address is not allowed."""
        if self._inner is None:
            # Created lazily: ThreadedResolver binds to the running loop.
            self._inner = aiohttp.DefaultResolver()
        results = await self._inner.resolve(host, port, family)
        for result in results:
            reason = address_block_reason(
                result["host"],
                allow_private=self.allow_private,
                allow_networks=self.allow_networks,
            )
            if reason is not None:
                raise FetchError(
                    "url_not_allowed", f"host {host!r} resolves to a {reason}; not fetched"
                )
        if not results:
            raise FetchError("download_failed", f"host {host!r} has no addresses")
        return results

    async def close(self) -> None:
        """Close the inner resolver if this one created it."""
        if self._inner is not None and self._owns_inner:
            await self._inner.close()


async def resolve_public(
    host: str,
    port: int,
    allow_private: bool,
    *,
    allow_networks: Sequence[IPNetwork] = (),
    dns: AbstractResolver | None = None,
) -> list[ResolveResult]:
    """Resolve `host` to addresses that may be connected to, or raise `FetchError`.

    `dns` replaces the system resolver (tests, or aiodns); it is not closed.
    """
    resolver = PublicOnlyResolver(allow_private, allow_networks=allow_networks, inner=dns)
    try:
        return await resolver.resolve(host, port, socket.AF_UNSPEC)
    except OSError as exc:
        raise FetchError("download_failed", f"cannot resolve {host!r}: {exc}") from None
    finally:
        await resolver.close()


def public_connector(
    resolver: PublicOnlyResolver, *, limit: int = 100, force_close: bool = False
) -> aiohttp.TCPConnector:
    """A connector that only connects to addresses `resolver` allowed.

    The DNS cache is off so that every connection is resolved (and checked)
    afresh. Use with `check_url` on every URL and `allow_redirects=False`:
    aiohttp does not consult the resolver for IP-literal hosts. The caller
    closes `resolver` after the session.
    """
    return aiohttp.TCPConnector(
        resolver=resolver, use_dns_cache=False, limit=limit, force_close=force_close
    )


# --------------------------------------------------------------------------- #
# Download
# --------------------------------------------------------------------------- #


async def fetch_to_file(
    url: str,
    dest: Path,
    max_bytes: int,
    timeout: float,
    allow_private: bool,
    *,
    allow_networks: Sequence[IPNetwork] = (),
    max_redirects: int = DEFAULT_MAX_REDIRECTS,
    dns: AbstractResolver | None = None,
) -> FetchResult:
    """Download `url` into `dest` (its folder must exist) under every check.

    At most `max_bytes` are accepted (more aborts the transfer at once), the
    whole exchange — redirects included — must finish within `timeout`
    seconds, and at most `max_redirects` redirects are followed, each checked
    like the first URL. On any failure no file is left behind (`dest` is
    only created, atomically, on success). `dns` replaces the system
    resolver (tests, or aiodns); it is not closed.
    """
    networks = tuple(allow_networks)
    current = _checked_url(url, allow_private, networks)
    resolver = PublicOnlyResolver(allow_private, allow_networks=networks, inner=dns)
    try:
        async with asyncio.timeout(timeout):
            async with aiohttp.ClientSession(
                connector=public_connector(resolver, force_close=True),
                timeout=aiohttp.ClientTimeout(total=timeout),
                headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
                auto_decompress=False,
                trust_env=False,
            ) as session:
                for _ in range(max_redirects + 1):
                    async with session.get(current, allow_redirects=False) as resp:
                        if resp.status in _REDIRECT_STATUSES:
                            current = _next_hop(resp, allow_private, networks)
                            continue
                        return await _save_body(resp, dest, max_bytes)
                raise FetchError(
                    "download_failed", f"more than {max_redirects} redirects from {url!r}"
                )
    except FetchError:
        raise
    except TimeoutError:
        raise FetchError(
            "download_timeout", f"downloading {url!r} took longer than {timeout:g} s"
        ) from None
    except aiohttp.ClientError as exc:
        raise FetchError(
            "download_failed", f"downloading {url!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        await resolver.close()


def _next_hop(
    resp: aiohttp.ClientResponse, allow_private: bool, networks: Sequence[IPNetwork]
) -> URL:
    location = resp.headers.get("Location")
    if not location:
        raise FetchError("download_failed", f"redirect ({resp.status}) without a Location")
    if any(ch < " " or ch == "\x7f" for ch in location) or "\\" in location:
        raise FetchError("url_not_allowed", "redirect Location contains odd characters")
    try:
        target = resp.url.join(URL(location))
    except (ValueError, TypeError) as exc:
        raise FetchError("download_failed", f"invalid redirect Location ({exc})") from None
    return _checked_url(str(target), allow_private, networks)


async def _save_body(resp: aiohttp.ClientResponse, dest: Path, max_bytes: int) -> FetchResult:
    if not 200 <= resp.status < 300:
        raise FetchError("download_failed", f"{resp.url} answered HTTP {resp.status}")
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # We asked for identity: a compressed body could expand past the cap
        # inside the decompressor before a single byte is counted.
        raise FetchError(
            "download_failed", f"server sent a compressed body (Content-Encoding: {encoding})"
        )
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise FetchError(
            "download_too_large",
            f"{resp.url} is {resp.content_length:,} bytes; the limit is {max_bytes:,}",
        )
    digest = hashlib.sha256()
    received = 0
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in resp.content.iter_chunked(_CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise FetchError(
                        "download_too_large",
                        f"{resp.url} sent more than {max_bytes:,} bytes (the limit)",
                    )
                digest.update(chunk)
                # Plain blocking writes: 64 KiB to local disk is far cheaper
                # than a thread hop per chunk.
                out.write(chunk)
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    # aiohttp reports application/octet-stream when the header is missing;
    # "not said" is more honest.
    content_type = resp.content_type if "Content-Type" in resp.headers else None
    return FetchResult(
        path=dest, bytes=received, sha256=digest.hexdigest(), content_type=content_type
    )
