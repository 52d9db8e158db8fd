"""ICE for browser calls: where the gateway offers candidates, and the STUN/TURN servers both sides use.

Contract: ``restrict_host_addresses`` makes aioice offer host candidates only on ``webrtc_ice_interfaces``;
``CandidatePolicy`` says which remote addresses a browser's candidate may name (so an offer cannot aim the
gateway's connectivity checks at this host, link-local metadata services or a left-out network), and
``bound_remote_candidates`` caps the remote candidates each connection keeps, peer-reflexive ones included.
aioice has no settings for these, so each replaces one aioice function, once, at start. TURN credentials are
minted per request with coturn's ``use-auth-secret`` scheme, so no long-lived TURN password reaches a browser.

Details: docs/webrtc.md#ice-nat-and-turn.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aioice.ice
import aioice.stun
import ifaddr
from aiortc import RTCConfiguration, RTCIceServer

if TYPE_CHECKING:
    from ..config import GatewaySettings

log = logging.getLogger(__name__)

_original_host_addresses: Callable[[bool, bool], list[str]] = aioice.ice.get_host_addresses
_original_add_remote_candidate = aioice.ice.Connection.add_remote_candidate
_original_check_incoming = aioice.ice.Connection.check_incoming
PEER_REFLEXIVE_ALLOWANCE = 4  # remote candidates learnt from the browser's checks, beyond those it offered

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def host_addresses(interfaces: Sequence[str], use_ipv4: bool = True, use_ipv6: bool = True) -> list[str]:
    """The addresses of the named interfaces (or the addresses themselves, if they are this host's)."""
    wanted = {_normal(item) for item in interfaces}
    addresses: list[str] = []
    for adapter in ifaddr.get_adapters():
        named = adapter.nice_name in wanted or adapter.name in wanted
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                if use_ipv4 and (named or _normal(ip.ip) in wanted):
                    addresses.append(ip.ip)
            elif use_ipv6 and ip.ip[2] == 0 and (named or _normal(ip.ip[0]) in wanted):  # no link-local (scoped)
                addresses.append(ip.ip[0])
    return addresses


def _normal(item: str) -> str:
    """An address in its canonical form (``0:0::1`` is ``::1``); an interface name as it is."""
    try:
        return str(ipaddress.ip_address(item))
    except ValueError:
        return item


def check_interfaces(interfaces: Sequence[str]) -> None:
    """Raise ValueError naming what in ``interfaces`` this host does not have (a typo must not leave the
    gateway with no candidates, and so no browser calls, without a word)."""
    adapters = ifaddr.get_adapters()
    names = {a.nice_name for a in adapters} | {a.name for a in adapters}
    ips = {_normal(ip.ip if isinstance(ip.ip, str) else ip.ip[0]) for a in adapters for ip in a.ips}
    missing = []
    for item in interfaces:
        try:
            known = str(ipaddress.ip_address(item)) in ips
        except ValueError:
            known = item in names
        if not known:
            missing.append(item)
    if missing:
        raise ValueError(f"webrtc_ice_interfaces: this host has no interface or address {', '.join(missing)} "
                         f"(it has: {', '.join(sorted(names))})")


def restrict_host_addresses(interfaces: Sequence[str]) -> None:
    """From now on, aioice offers host candidates on ``interfaces`` only (empty: its default, every address but
    loopback)."""
    if not interfaces:
        aioice.ice.get_host_addresses = _original_host_addresses
        return
    chosen = tuple(interfaces)

    def restricted(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return host_addresses(chosen, use_ipv4, use_ipv6)

    aioice.ice.get_host_addresses = restricted


@dataclass(frozen=True)
class CandidatePolicy:
    """Which addresses a browser's ICE candidates may name (see the module's docstring); ``refuse`` is
    ``offer.read_offer``'s ``address_check``."""

    loopback: bool  # the gateway offers a loopback candidate, so a loopback peer is a real one (tests, a proxy)
    families: frozenset[int]  # IP versions the gateway offers non-loopback candidates in
    foreign: tuple[IpNetwork, ...]  # networks of this host's interfaces that are not for browsers

    def refuse(self, address: IpAddress) -> str | None:
        """Why the gateway does not send to ``address`` (None: it may)."""
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_loopback:
            return None if self.loopback else "this gateway's own host (loopback is not in webrtc_ice_interfaces)"
        if address.is_link_local:
            return "a link-local address"
        if address.version not in self.families:
            return f"IPv{address.version}, which this gateway offers no candidate in"
        for network in self.foreign:
            if address in network:
                return f"in {network}, a network of an interface not in webrtc_ice_interfaces"
        return None


def candidate_policy(interfaces: Sequence[str]) -> CandidatePolicy:
    """The policy for a gateway offering host candidates on ``interfaces`` (empty: every address but loopback);
    reads this host's interfaces (cheap: one getifaddrs)."""
    wanted = {_normal(item) for item in interfaces}
    chosen: list[IpNetwork] = []
    others: list[IpNetwork] = []
    loopback = False
    families: set[int] = set()
    for adapter in ifaddr.get_adapters():
        named = adapter.nice_name in wanted or adapter.name in wanted
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                network = ipaddress.ip_network(f"{text}/{ip.network_prefix}", strict=False)
            except ValueError:
                continue  # a scoped IPv6 address ifaddr could not render
            address = ipaddress.ip_address(text)
            offered = (not address.is_loopback) if not wanted else (named or _normal(text) in wanted)
            if offered and address.is_loopback:
                loopback = True
            elif offered and not address.is_link_local:
                families.add(address.version)
            if not address.is_loopback and not address.is_link_local:
                (chosen if offered else others).append(network)
    foreign = tuple(net for net in others if not any(net.overlaps(own) for own in chosen))
    return CandidatePolicy(loopback=loopback, families=frozenset(families), foreign=foreign)


def bound_remote_candidates(limit: int | None) -> None:
    """From now on, each aioice connection keeps at most ``limit`` remote candidates: offered ones past it are
    ignored, and incoming checks from a new address past it are answered but start no check back (no new
    peer-reflexive candidate). None: aioice's own behaviour (no bound)."""
    if limit is None:
        aioice.ice.Connection.add_remote_candidate = _original_add_remote_candidate  # type: ignore[method-assign]
        aioice.ice.Connection.check_incoming = _original_check_incoming  # type: ignore[method-assign]
        return

    @functools.wraps(_original_add_remote_candidate)
    async def add_remote_candidate(self: aioice.ice.Connection, candidate: aioice.Candidate | None) -> None:
        if candidate is not None and len(self._remote_candidates) >= limit:
            log.info("ICE: remote candidate past the bound of %d ignored", limit)
            return
        await _original_add_remote_candidate(self, candidate)

    @functools.wraps(_original_check_incoming)
    def check_incoming(self: aioice.ice.Connection, message: aioice.stun.Message, addr: tuple[str, int],
                       protocol: Any) -> None:
        known = any(c._network_host == addr[0] and c.port == addr[1] for c in self._remote_candidates)
        if not known and len(self._remote_candidates) >= limit:
            return  # answered already (1:1); a new pair would send checks to an address nobody offered
        _original_check_incoming(self, message, addr, protocol)

    aioice.ice.Connection.add_remote_candidate = add_remote_candidate  # type: ignore[method-assign]
    aioice.ice.Connection.check_incoming = check_incoming  # type: ignore[method-assign]


def check_ice_server_url(url: str) -> None:
    """ValueError unless aiortc's ICE agent can use ``url`` (checked at start: a URL it cannot parse would fail
    every call's answer)."""
    from aiortc.rtcicetransport import parse_stun_turn_uri

    try:
        parsed = parse_stun_turn_uri(url)
    except ValueError as exc:
        raise ValueError(f"webrtc_ice_servers: {url!r} cannot be used ({exc}); expected e.g. "
                         "turn:turn.example.com:3478?transport=udp") from None
    if parsed["scheme"] == "stuns":
        raise ValueError(f"webrtc_ice_servers: {url!r}: the gateway's ICE agent has no STUN over TLS; use stun:")


def turn_credential(secret: str, seconds: int, now: float | None = None) -> tuple[str, str]:
    """A TURN REST API credential valid for ``seconds``: (username, password)."""
    expiry = int((time.time() if now is None else now) + seconds)
    username = f"{expiry}:personagate"
    password = base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return username, password


def ice_servers(settings: GatewaySettings) -> list[dict[str, Any]]:
    """The ICE servers as ``RTCIceServer`` dictionaries (credentials minted where the settings say so)."""
    out: list[dict[str, Any]] = []
    secret = settings.webrtc_turn_secret
    for server in settings.webrtc_ice_servers:
        entry: dict[str, Any] = {"urls": list(server.urls)}
        if server.username is not None:
            entry["username"] = server.username
            if server.credential is not None:
                entry["credential"] = server.credential.get_secret_value()
        elif secret is not None and any(url.startswith(("turn:", "turns:")) for url in server.urls):
            entry["username"], entry["credential"] = turn_credential(
                secret.get_secret_value(), settings.webrtc_turn_credential_seconds)
        out.append(entry)
    return out


def rtc_configuration(settings: GatewaySettings) -> RTCConfiguration:
    """The gateway's own ``RTCPeerConnection`` configuration (no servers: host candidates only)."""
    return RTCConfiguration(iceServers=[RTCIceServer(**entry) for entry in ice_servers(settings)])
