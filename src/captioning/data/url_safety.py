"""Which network addresses an image URL may reach, checked on the address actually connected to.

A program that fetches URLs it is given reaches its own network: `http://169.254.169.254/` is the
cloud metadata service, `http://127.0.0.1:6379/` a local database. `images._fetch` follows
redirects by hand; every hop's connection comes from `checked_adapter`, whose connections resolve
the host name themselves, check each address against an `AddressPolicy` and connect only to one
it allows -- the address checked is the address connected to, so a DNS answer that changes
between a check and the connection (DNS rebinding) cannot slip past, and a refused address is
never connected to. Under `allow_private=False` the environment's proxies are not used (the
address checked would be the proxy's); elsewhere a proxy, when set, reaches the URL for us.
"""
from __future__ import annotations

import ipaddress
import socket

import requests
import urllib3
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection


class AddressRefused(Exception):
    """A hop whose host has no address the policy allows; raised before any connection."""


def address_kind(ip: str) -> str | None:
    """'loopback', 'link-local', 'private' or 'non-public' for an address a URL fetch should not
    reach without being told it may; None for a public (global unicast) address."""
    address = ipaddress.ip_address(ip.split("%")[0])                  # fe80::1%eth0: no scope
    if address.version == 6 and address.ipv4_mapped is not None:     # ::ffff:127.0.0.1
        address = address.ipv4_mapped
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_private:
        return "private"
    if address.is_multicast or address.is_unspecified or address.is_reserved \
            or not address.is_global:
        return "non-public"
    return None


class AddressPolicy:
    """`allow_private` True: any address. False: public addresses only, at every hop (a server
    fetching URLs that others send). None: the user's own URL may be anywhere -- they chose it --
    but a redirect from a public address may not lead to a non-public one (a public page sending
    the fetcher to the metadata service); one that starts on the user's network may stay there.
    `hop` is the redirect count of the URL being fetched (images._fetch sets it)."""

    def __init__(self, allow_private: bool | None):
        self.allow_private = allow_private
        self.hop = 0
        self.started_private = False

    def refuses(self, ip: str) -> str | None:
        """Why `ip` may not be connected to now (its kind), or None when it may."""
        kind = address_kind(ip)
        if kind is None or self.allow_private:
            return None
        if self.allow_private is None and (self.hop == 0 or self.started_private):
            self.started_private = True
            return None
        return kind

    def reason(self, host: str, ip: str, kind: str) -> str:
        if self.allow_private is False:
            return (f"refused: {host} is {ip}, a {kind} address (only public addresses are "
                    "fetched here)")
        return (f"refused: a redirect from a public address to {host}, which is {ip}, a {kind} "
                "address")


def _connect(conn: urllib3.connection.HTTPConnection, policy: AddressPolicy):
    """HTTPConnection._new_conn with the address check: resolve, keep the allowed addresses,
    connect to the first that answers."""
    try:
        found = socket.getaddrinfo(conn._dns_host, conn.port, 0, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise NameResolutionError(conn.host, conn, e) from e
    allowed, refused = [], None
    for *_, sockaddr in found:
        kind = policy.refuses(sockaddr[0])
        if kind is None:
            allowed.append(sockaddr[0])
        else:
            refused = refused or (sockaddr[0], kind)
    if not allowed:
        raise AddressRefused(policy.reason(conn.host, *refused))
    error: OSError | None = None
    for ip in allowed:
        try:
            return connection.create_connection((ip, conn.port), conn.timeout,
                                                source_address=conn.source_address,
                                                socket_options=conn.socket_options)
        except TimeoutError as e:
            raise ConnectTimeoutError(conn, f"Connection to {conn.host} timed out. "
                                            f"(connect timeout={conn.timeout})") from e
        except OSError as e:
            error = e
    raise NewConnectionError(conn, f"Failed to establish a new connection: {error}")


def checked_adapter(policy: AddressPolicy) -> requests.adapters.HTTPAdapter:
    """A requests adapter (mount it on http:// and https://) whose connections obey `policy`.
    TLS still checks the certificate against the host name: only the address is pinned."""
    def new_conn(conn):
        return _connect(conn, policy)

    http = type("CheckedHTTPConnection", (urllib3.connection.HTTPConnection,),
                {"_new_conn": new_conn})
    https = type("CheckedHTTPSConnection", (urllib3.connection.HTTPSConnection,),
                 {"_new_conn": new_conn})
    adapter = requests.adapters.HTTPAdapter(max_retries=0)
    adapter.poolmanager.pool_classes_by_scheme = {
        "http": type("CheckedPool", (urllib3.HTTPConnectionPool,), {"ConnectionCls": http}),
        "https": type("CheckedTLSPool", (urllib3.HTTPSConnectionPool,), {"ConnectionCls": https})}
    return adapter


def checked_session(policy: AddressPolicy) -> requests.Session:
    """A session whose every connection goes through `checked_adapter(policy)`."""
    session = requests.Session()
    if policy.allow_private is False:
        session.trust_env = False        # no proxy: the address checked must be the one reached
    adapter = checked_adapter(policy)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
