"""Tests for gpu_runner.fetch: URL and address policy, pinned resolution, downloads.

Downloads run against a real aiohttp server on 127.0.0.1. Public addresses
cannot be reached from tests, so two stand-ins are used and named as such:
`FakeDNS` replaces the system resolver (it answers chosen addresses for
made-up names), and `allow_networks=[127.0.0.1/32]` makes the loopback test
server play the part of a public host while every other private address
stays forbidden.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_runner.fetch import (
    FetchError,
    FetchResult,
    PublicOnlyResolver,
    address_block_reason,
    check_url,
    fetch_to_file,
    resolve_public,
)

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
LOOPBACK_ONLY = (ipaddress.ip_network("127.0.0.1/32"),)
PAYLOAD = bytes(range(256)) * 400  # 100 KiB


class FakeDNS(AbstractResolver):
    """Stands in for DNS, which tests cannot reach: answers from a fixed table."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"FakeDNS: no such host {host}")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.table[host]
        ]

    async def close(self) -> None:
        """Nothing to release."""


# --------------------------------------------------------------------------- #
# Address policy
# --------------------------------------------------------------------------- #

BLOCKED_ALWAYS = [
    ("169.254.169.254", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("168.63.129.16", "metadata"),
    ("::ffff:169.254.169.254", "metadata"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("255.255.255.255", "reserved"),
    ("240.0.0.1", "reserved"),
    ("192.0.2.1", "documentation"),
    ("2001:db8::1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("::127.0.0.1", "IPv4-compatible"),
    ("100::1", "discard"),
]
BLOCKED_UNLESS_PRIVATE_ALLOWED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fc00::1", "unique-local"),
    ("fd12:3456::1", "unique-local"),
    ("fec0::1", "site-local"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:7f00:1", "IPv4-mapped loopback"),
    ("::ffff:10.1.2.3", "IPv4-mapped private"),
    ("::ffff:0:192.168.0.1", "IPv4-translated private"),
    ("64:ff9b::10.0.0.1", "NAT64 private"),
    ("64:ff9b::7f00:1", "NAT64 loopback"),
    ("2002:7f00:1::", "6to4 loopback"),
    ("2002:c0a8:101::1", "6to4 private"),
]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "172.32.0.1",  # just past 172.16/12
    "100.128.0.1",  # just past 100.64/10
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::8.8.8.8",
    "2002:808:808::1",
]


@pytest.mark.parametrize(("address", "fragment"), BLOCKED_ALWAYS)
def test_always_blocked_addresses(address: str, fragment: str) -> None:
    """Metadata, unspecified, multicast, reserved and documentation addresses
    are refused even with allow_private."""
    for allow_private in (False, True):
        reason = address_block_reason(address, allow_private=allow_private)
        assert reason is not None and fragment in reason, (address, reason)


@pytest.mark.parametrize(("address", "fragment"), BLOCKED_UNLESS_PRIVATE_ALLOWED)
def test_private_addresses_need_allow_private(address: str, fragment: str) -> None:
    """Loopback, private, link-local, CGNAT, ULA — and IPv6 forms embedding
    them (mapped, translated, NAT64, 6to4) — are refused unless allow_private."""
    reason = address_block_reason(address, allow_private=False)
    assert reason is not None and fragment in reason, (address, reason)
    assert address_block_reason(address, allow_private=True) is None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    """Globally routable addresses (including embeddings of public IPv4) pass."""
    assert address_block_reason(address) is None


def test_allow_networks_is_an_exact_exception() -> None:
    """allow_networks lifts the private rule for those networks only, and never
    lifts an always-blocked rule."""
    nets = (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("169.254.169.254/32"))
    assert address_block_reason("10.1.2.3", allow_networks=nets) is None
    assert address_block_reason("::ffff:10.1.2.3", allow_networks=nets) is None
    assert address_block_reason("10.2.0.1", allow_networks=nets) is not None
    assert address_block_reason("169.254.169.254", allow_networks=nets) is not None


def test_garbage_is_not_an_address() -> None:
    """A resolver answer that is not an IP address is refused, not crashed on."""
    reason = address_block_reason("not-an-ip")
    assert reason is not None and "not an IP address" in reason


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(v=4), st.booleans())
def test_ipv6_embeddings_share_the_ipv4_verdict(v4: ipaddress.IPv4Address, private: bool) -> None:
    """An IPv4 address and its IPv4-mapped, NAT64 and 6to4 IPv6 forms are
    allowed or refused alike, so no embedding is a way around the policy."""
    verdict = address_block_reason(v4, allow_private=private) is None
    forms = [
        ipaddress.IPv6Address(f"::ffff:{v4}"),
        ipaddress.IPv6Address(f"64:ff9b::{v4}"),
        ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80) | 1),
    ]
    for form in forms:
        assert (address_block_reason(form, allow_private=private) is None) == verdict, form


# --------------------------------------------------------------------------- #
# URL checks
# --------------------------------------------------------------------------- #

BAD_URLS = [
    ("ftp://example.com/a.zip", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("gopher://example.com:70/", "only http and https"),
    ("javascript:alert(1)", "only http and https"),
    ("//example.com/a.zip", "only http and https"),
    ("http://user:pw@example.com/", "user info"),
    ("http://example.com@127.0.0.1/", "user info"),
    ("http://127.0.0.1/", "loopback"),
    ("http://127.0.0.1.:8080/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:7f00:1]/", "loopback"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "metadata"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
    ("http://10.0.0.5/data.zip", "private"),
    ("http://localhost:8080/", "localhost"),
    ("http://api.localhost/", "localhost"),
    ("http://2130706433/", "numeric host"),
    ("http://0x7f.1/", "numeric host"),
    ("http://0177.0.0.1/", "numeric host"),
    ("http://127.1/", "numeric host"),
    ("http://127.000.000.001/", "numeric host"),
    ("http://%31%32%37.0.0.1/", "percent-encoded"),
    ("http://localhost%00.example.com/", "percent-encoded"),
    ("http://\u217cocalhost/", "localhost"),  # IDNA maps the roman numeral to "l"
    ("http://\u2460\u2461\u2466.0.0.1/", "loopback"),  # circled digits normalise to 127
    ("http://127\u30020\u30020\u30021/", "loopback"),  # ideographic full stops
    ("http://[fe80::1%25eth0]/", "link-local"),
    ("http://example.com\\@127.0.0.1/", "backslash"),
    ("http://exa mple.com/", "whitespace"),
    ("http://example.com/\r\nHost: evil", "control"),
    ("http:///nohost", "no host"),
    ("http://example.com:0/", "port"),
    ("http://example.com:99999/", "valid URL"),
    ("http://" + "a" * 5000 + ".com/", "longer than"),
]


@pytest.mark.parametrize(("url", "fragment"), BAD_URLS)
def test_bad_urls_are_refused(url: str, fragment: str) -> None:
    """Non-HTTP schemes, user info, parser-confusing characters, disguised
    numeric hosts and non-public IP literals are refused with a reason."""
    with pytest.raises(FetchError) as caught:
        check_url(url, allow_private=False)
    assert caught.value.code == "url_not_allowed"
    assert fragment in caught.value.message


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/a.zip",
        "https://example.com:8443/data?x=1#frag",
        "HTTPS://EXAMPLE.COM/A.ZIP",
        "http://8.8.8.8/",
        "http://[2606:4700:4700::1111]/",
        "https://bücher.example/photo.jpg",
        "http://example.com./a.zip",
    ],
)
def test_good_urls_pass(url: str) -> None:
    """Ordinary public http(s) URLs pass the DNS-free checks."""
    check_url(url, allow_private=False)


def test_allow_private_admits_lan_urls_but_not_metadata() -> None:
    """allow_private admits loopback/LAN URLs; metadata endpoints stay refused."""
    check_url("http://127.0.0.1:8080/a.zip", allow_private=True)
    check_url("http://localhost:8080/a.zip", allow_private=True)
    check_url("http://192.168.1.10/a.zip", allow_private=True)
    with pytest.raises(FetchError):
        check_url("http://169.254.169.254/", allow_private=True)
    with pytest.raises(FetchError):
        check_url("http://metadata.google.internal/", allow_private=True)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.from_regex(r"\Ahttps?://[^/]{0,30}/?.{0,20}\Z")))
def test_check_url_only_ever_raises_fetch_error(url: str) -> None:
    """Arbitrary input either passes or raises FetchError(url_not_allowed); when
    it passes with an IP-literal host, that address is public."""
    try:
        check_url(url, allow_private=False)
    except FetchError as exc:
        assert exc.code == "url_not_allowed"
        return
    from yarl import URL

    host = (URL(url).raw_host or "").rstrip(".")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return
    assert address_block_reason(host) is None


# --------------------------------------------------------------------------- #
# Resolution
# --------------------------------------------------------------------------- #


async def test_resolver_refuses_names_with_any_private_answer() -> None:
    """A name is refused when any of its addresses is disallowed — a mix of
    public and private answers is a DNS-rebinding trick — and allowed when
    all are public."""
    dns = FakeDNS(
        {
            "public.test": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
            "mixed.test": ["93.184.216.34", "10.0.0.1"],
            "mapped.test": ["::ffff:127.0.0.1"],
            "meta.test": ["169.254.169.254"],
            "lan.test": ["192.168.1.20"],
        }
    )
    results = await resolve_public("public.test", 443, False, dns=dns)
    assert [r["host"] for r in results] == ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]
    for name in ("mixed.test", "mapped.test", "meta.test", "lan.test"):
        with pytest.raises(FetchError) as caught:
            await resolve_public(name, 443, False, dns=dns)
        assert caught.value.code == "url_not_allowed", name
    assert (await resolve_public("lan.test", 80, True, dns=dns))[0]["host"] == "192.168.1.20"
    with pytest.raises(FetchError):
        await resolve_public("meta.test", 80, True, dns=dns)


async def test_resolver_checks_every_resolution() -> None:
    """The check runs on every call, so an answer that changes between
    resolutions (DNS rebinding) is caught the moment it turns private."""
    dns = FakeDNS({"flip.test": ["93.184.216.34"]})
    resolver = PublicOnlyResolver(False, inner=dns)
    assert await resolver.resolve("flip.test", 80)
    dns.table["flip.test"] = ["127.0.0.1"]
    with pytest.raises(FetchError):
        await resolver.resolve("flip.test", 80)
    assert dns.asked == ["flip.test", "flip.test"]
    await resolver.close()


async def test_unresolvable_name_is_download_failed() -> None:
    """A name that does not resolve is a download failure, not a policy refusal."""
    with pytest.raises(FetchError) as caught:
        await resolve_public("nowhere.test", 80, False, dns=FakeDNS({}))
    assert caught.value.code == "download_failed"


# --------------------------------------------------------------------------- #
# Downloads against a real server
# --------------------------------------------------------------------------- #


def _app(hits: list[str]) -> web.Application:
    """A server with the behaviours the download tests need."""

    async def record(request: web.Request) -> None:
        hits.append(request.path_qs)

    async def data(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(body=PAYLOAD, content_type="application/zip")

    async def redirect(request: web.Request) -> web.Response:
        await record(request)
        raise web.HTTPFound(request.query["to"])

    async def loop(request: web.Request) -> web.Response:
        await record(request)
        raise web.HTTPFound("/loop")

    async def endless(request: web.Request) -> web.StreamResponse:
        """Chunked, no Content-Length, until the client hangs up (or 64 MiB)."""
        await record(request)
        resp = web.StreamResponse()
        await resp.prepare(request)
        chunk = b"z" * 65536
        try:
            for _ in range(1024):
                await resp.write(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    async def trickle(request: web.Request) -> web.StreamResponse:
        """A byte every 50 ms for up to 3 s: only a total deadline stops it."""
        await record(request)
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            for _ in range(60):
                await resp.write(b".")
                await asyncio.sleep(0.05)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    async def gzipped(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(
            body=gzip.compress(bytes(1024 * 1024)), headers={"Content-Encoding": "gzip"}
        )

    async def missing(request: web.Request) -> web.Response:
        await record(request)
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_get("/data.zip", data)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/loop", loop)
    app.router.add_get("/endless", endless)
    app.router.add_get("/trickle", trickle)
    app.router.add_get("/gzipped", gzipped)
    app.router.add_get("/missing", missing)
    return app


@pytest.fixture
async def server(aiohttp_server: ServerFactory) -> tuple[TestServer, list[str]]:
    """The test server on 127.0.0.1 and the list of paths it was asked for."""
    hits: list[str] = []
    return await aiohttp_server(_app(hits)), hits


def names(folder: Path) -> list[str]:
    """The sorted names in `folder` (leftover partial files would show here)."""
    return sorted(p.name for p in folder.iterdir())


def _url(srv: TestServer, path: str) -> str:
    return str(srv.make_url(path))


async def test_download_with_allow_private(
    server: tuple[TestServer, list[str]], tmp_path: Path
) -> None:
    """With allow_private a loopback URL downloads: bytes, SHA-256 and media type
    are reported and only the final file remains."""
    srv, _ = server
    dest = tmp_path / "data.zip"
    result = await fetch_to_file(_url(srv, "/data.zip"), dest, 10**6, 5.0, True)
    assert result == FetchResult(
        path=dest,
        bytes=len(PAYLOAD),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        content_type="application/zip",
    )
    assert dest.read_bytes() == PAYLOAD
    assert names(tmp_path) == ["data.zip"]


async def test_loopback_refused_without_allow_private(
    server: tuple[TestServer, list[str]], tmp_path: Path
) -> None:
    """Without allow_private the loopback server is never contacted."""
    srv, hits = server
    with pytest.raises(FetchError) as caught:
        await fetch_to_file(_url(srv, "/data.zip"), tmp_path / "x", 10**6, 5.0, False)
    assert caught.value.code == "url_not_allowed"
    assert hits == [] and names(tmp_path) == []


async def test_size_cap_aborts_the_stream(
    server: tuple[TestServer, list[str]], tmp_path: Path
) -> None:
    """A body without Content-Length is cut off as soon as it passes max_bytes
    (well before the deadline), and the partial file is removed."""
    srv, _ = server
    with pytest.raises(FetchError) as caught:
        await fetch_to_file(_url(srv, "/endless"), tmp_path / "x", 256 * 1024, 20.0, True)
    assert caught.value.code == "download_too_large"
    assert names(tmp_path) == []


async def test_declared_length_over_cap_is_refused_early(
    server: tuple[TestServer, list[str]], tmp_path: Path
) -> None:
    """A Content-Length above max_bytes is refused before the body is read;
    exactly max_bytes is accepted."""
    srv, _ = server
    with pytest.raises(FetchError) as caught:
        await fetch_to_file(_url(srv, "/data.zip"), tmp_path / "x", len(PAYLOAD) - 1, 5.0, True)
    assert caught.value.code == "download_too_large"
    assert names(tmp_path) == []
    result = await fetch_to_file(_url(srv, "/data.zip"), tmp_path / "y", len(PAYLOAD), 5.0, True)
    assert result.bytes == len(PAYLOAD)


async def test_total_timeout(server: tuple[TestServer, list[str]], tmp_path: Path) -> None:
    """A server that keeps trickling bytes cannot hold a download past the
    deadline; nothing is left behind."""
    srv, _ = server
    with pytest.raises(FetchError) as caught:
        await fetch_to_file(_url(srv, "/trickle"), tmp_path / "x", 10**6, 0.4, True)
    assert caught.value.code == "download_timeout"
    assert names(tmp_path) == []


async def test_redirects_are_followed_and_each_hop_checked(
    server: tuple[TestServer, list[str]], tmp_path: Path
) -> None:
    """Redirects are followed (relative and absolute); a hop to a metadata
    address is refused even with allow_private, before any connection."""
    srv, hits = server
    hop2 = _url(srv, "/redirect") + "?to=/data.zip"
    start = _url(srv, "/redirect") + "?to=" + hop2.replace("?", "%3F").replace("=", "%3D")
    result = await fetch_to_file(start, tmp_path / "ok", 10**6, 5.0, True)
    assert result.bytes == len(PAYLOAD)
    assert hits[-1] == "/data.zip"
    for target in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/"):
        with pytest.raises(FetchError) as caught:
            await fetch_to_file(
                _url(srv, "/redirect") + "?to=" + target, tmp_path / "x", 10**6, 5.0, True
            )
        assert caught.value.code == "url_not_allowed"
    assert names(tmp_path) == ["ok"]


async def test_redirect_to_disallowed_address_without_allow_private(
    server: tuple[TestServer, list[str]], tmp_path: Path
) -> None:
    """With allow_private off (the test server admitted via allow_networks as a
    stand-in for a public host), a redirect to any other private address — an
    IP literal or a name resolving to one — is refused, and a name resolving to
    an allowed address is fetched from exactly that address (pinned)."""
    srv, hits = server
    port = srv.port
    dns = FakeDNS({"internal.test": ["10.1.2.3"], "files.test": ["127.0.0.1"]})
    direct = await fetch_to_file(
        _url(srv, "/data.zip"),
        tmp_path / "direct",
        10**6,
        5.0,
        False,
        allow_networks=LOOPBACK_ONLY,
        dns=dns,
    )
    assert direct.bytes == len(PAYLOAD)
    for target in (
        f"http://127.0.0.2:{port}/data.zip",
        f"http://[::1]:{port}/data.zip",
        f"http://localhost:{port}/data.zip",
        f"http://internal.test:{port}/data.zip",
        f"http://192.168.0.1:{port}/data.zip",
    ):
        before = len(hits)
        with pytest.raises(FetchError) as caught:
            await fetch_to_file(
                _url(srv, "/redirect") + "?to=" + target,
                tmp_path / "x",
                10**6,
                5.0,
                False,
                allow_networks=LOOPBACK_ONLY,
                dns=dns,
            )
        assert caught.value.code == "url_not_allowed", target
        assert len(hits) == before + 1 and hits[-1].startswith("/redirect"), target
    # files.test exists only in FakeDNS: this succeeds only if the connection
    # goes to the address the resolver checked.
    pinned = await fetch_to_file(
        _url(srv, "/redirect") + f"?to=http://files.test:{port}/data.zip",
        tmp_path / "pinned",
        10**6,
        5.0,
        False,
        allow_networks=LOOPBACK_ONLY,
        dns=dns,
    )
    assert pinned.bytes == len(PAYLOAD)
    assert "files.test" in dns.asked
    assert names(tmp_path) == ["direct", "pinned"]


async def test_too_many_redirects(server: tuple[TestServer, list[str]], tmp_path: Path) -> None:
    """A redirect loop stops after max_redirects hops."""
    srv, hits = server
    with pytest.raises(FetchError) as caught:
        await fetch_to_file(_url(srv, "/loop"), tmp_path / "x", 10**6, 5.0, True, max_redirects=3)
    assert caught.value.code == "download_failed" and "redirects" in caught.value.message
    assert len(hits) == 4


async def test_http_errors_and_compressed_bodies_fail(
    server: tuple[TestServer, list[str]], tmp_path: Path
) -> None:
    """An error status is download_failed; so is a compressed body we did not
    ask for (it could expand past the cap inside the decompressor)."""
    srv, _ = server
    for path in ("/missing", "/gzipped"):
        with pytest.raises(FetchError) as caught:
            await fetch_to_file(_url(srv, path), tmp_path / "x", 10**6, 5.0, True)
        assert caught.value.code == "download_failed", path
    assert names(tmp_path) == []


async def test_connection_refused_is_download_failed(tmp_path: Path) -> None:
    """Nothing listening is a download failure with the cause in the message."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError) as caught:
        await fetch_to_file(f"http://127.0.0.1:{port}/", tmp_path / "x", 100, 5.0, True)
    assert caught.value.code == "download_failed"
