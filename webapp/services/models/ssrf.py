"""SSRF guard for URL imports: checked on the address actually connected to, on every hop.

A URL import makes the server fetch whatever a user names, so without a guard any user could read
the cloud metadata service (169.254.169.254, fd00:ec2::254), the studio's own loopback APIs or
anything on the private network. Checking the *URL* is not enough: a public name can resolve to a
private address (or re-resolve to one between check and connect — DNS rebinding), and a public
server can redirect to a private one. So the check sits in the connection itself: an httpcore
network backend resolves the host, refuses every address that is not globally routable, and connects
to the very address it checked. TLS still verifies and sends SNI for the URL's host name, and the
Host header is untouched, because httpcore passes the name to TLS separately from the socket.

An allow-list (setting ``url_import_allow``: hosts, ``host:port``, IPs or CIDRs) lets tests and
trusted in-house mirrors through; it is empty by default.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
ALLOWED_SCHEMES = ("http", "https")


NAT64_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def embedded_ipv4(ip: Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries and that a gateway may deliver to: NAT64, 6to4, Teredo and
    the old IPv4-compatible form. ``64:ff9b::7f00:1`` is global by itself but reaches 127.0.0.1."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found: list[ipaddress.IPv4Address] = []
    if any(ip in net for net in NAT64_PREFIXES) or int(ip) >> 32 == 0:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


class BlockedUrl(Exception):
    """The URL (or a redirect, or the address a name resolved to) is not one imports may reach."""


def _describe(ip: Address) -> str:
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (cloud metadata)"
    if ip.is_private:
        return "private"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    return "non-public"


class SsrfGuard:
    """Decides which (host, address, port) a URL import may connect to."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._ip_ports: set[tuple[Address, int]] = set()
        self._hosts: set[str] = set()
        self._host_ports: set[tuple[str, int]] = set()
        for entry in allow:
            self._add(entry.strip())

    def _add(self, entry: str) -> None:
        if not entry:
            return
        try:
            self._networks.append(ipaddress.ip_network(entry, strict=False))
            return
        except ValueError:
            pass
        host, port = entry, None
        if entry.startswith("["):  # [v6]:port
            host, _, rest = entry[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else None
        elif entry.count(":") == 1:
            host, _, port_text = entry.partition(":")
            port = int(port_text)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if port is None:
                self._hosts.add(host.lower())
            else:
                self._host_ports.add((host.lower(), port))
            return
        if port is None:
            self._networks.append(ipaddress.ip_network(ip))
        else:
            self._ip_ports.add((ip, port))

    def allowed_by_list(self, host: str, ip: Address, port: int) -> bool:
        host = host.lower().strip("[]")
        return (host in self._hosts or (host, port) in self._host_ports or (ip, port) in self._ip_ports
                or any(ip in net for net in self._networks))

    def check_address(self, host: str, ip: Address, port: int) -> None:
        """Raise `BlockedUrl` unless `ip` is public or allow-listed."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.allowed_by_list(host, ip, port):
            return
        for target in (ip, *embedded_ipv4(ip)):
            if not target.is_global or target.is_multicast:
                shown = host if host == str(target) else f"{host} ({target})"
                raise BlockedUrl(f"{shown} is a {_describe(target)} address; URL imports may only reach public "
                                 f"addresses")

    def check_url(self, url: httpx.URL) -> None:
        """Cheap checks before any connection: scheme, host present, literal addresses."""
        if url.scheme not in ALLOWED_SCHEMES:
            raise BlockedUrl(f"{url.scheme or 'no'} scheme: only http and https URLs can be imported")
        if not url.host:
            raise BlockedUrl("the URL has no host")
        try:
            ip = ipaddress.ip_address(url.host.strip("[]"))
        except ValueError:
            return  # a name: checked when it is resolved, at connect time
        self.check_address(url.host, ip, url.port or (443 if url.scheme == "https" else 80))

    def resolve(self, host: str, port: int) -> list[Address]:
        """The addresses `host` may be connected to (all checked); raises if there are none."""
        try:
            infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror}") from None
        addresses: list[Address] = []
        refusal: BlockedUrl | None = None
        for info in infos:
            ip = ipaddress.ip_address(info[4][0])
            try:
                self.check_address(host, ip, port)
            except BlockedUrl as exc:
                refusal = exc
                continue
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise refusal or BlockedUrl(f"{host} resolves to no address")
        return addresses


class _GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, connecting only to addresses the guard approved."""

    def __init__(self, guard: SsrfGuard) -> None:
        self._guard = guard

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        last_error: httpcore.ConnectError | None = None
        for ip in self._guard.resolve(host, port):
            try:  # connect to the checked address literally: no second DNS lookup to be rebound
                stream = super().connect_tcp(str(ip), port, timeout=timeout, local_address=local_address,
                                             socket_options=socket_options)
            except httpcore.ConnectError as exc:
                last_error = exc
                continue
            log.debug("url import: connected to %s for %s:%d", ip, host, port)
            return stream
        raise last_error or httpcore.ConnectError(f"cannot connect to {host}:{port}")

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        raise BlockedUrl("unix sockets are not reachable by URL imports")


_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout), (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout), (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectError, httpx.ConnectError), (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError), (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError), (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.NetworkError, httpx.NetworkError), (httpcore.TimeoutException, httpx.TimeoutException),
)


def _mapped(exc: Exception, request: httpx.Request | None) -> Exception:
    for source, target in _ERRORS:
        if isinstance(exc, source):
            return target(str(exc), request=request) if request is not None else target(str(exc))
    return exc


class _Body(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except httpcore.TimeoutException as exc:
            raise _mapped(exc, None) from None
        except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise _mapped(exc, None) from None

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class GuardedTransport(httpx.BaseTransport):
    """An httpx transport whose every connection goes through `SsrfGuard` (no proxies, no unix sockets)."""

    def __init__(self, guard: SsrfGuard, *, verify: ssl.SSLContext | None = None) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=verify or ssl.create_default_context(), max_connections=8, retries=0,
            network_backend=_GuardedBackend(guard),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port,
                             target=request.url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions,
        )
        try:
            response = self._pool.handle_request(core_request)
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise _mapped(exc, request) from None
        return httpx.Response(status_code=response.status, headers=response.headers,
                              stream=_Body(response.stream), extensions=response.extensions)  # type: ignore[arg-type]

    def close(self) -> None:
        self._pool.close()
