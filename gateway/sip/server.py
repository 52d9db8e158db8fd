"""The gateway's SIP front end: a pjsua2 user agent on its own thread that answers INVITEs with agent calls.

    sip = SipServer(settings, registry, calls)   # the app's lifespan does this
    await sip.start()                            # listening on sip_host:sip_port (UDP, TCP), sip_tls_port (TLS)
    ...
    await sip.stop()                             # BYE / 503 to every call, the endpoint destroyed

Contract: an INVITE is decided on the pjsua thread at once (``_incoming``): trunk admission first (``sip_allow``
and digest, ``auth.py``; a stranger learns nothing about the numbers), then the dialed number →
``TenantRegistry.route`` (404, the after-hours answer, or 180 Ringing and an ``InboundCall`` takes over on the
event loop). Refusals are sent outside pjsua's callback (``Leg.refuse``). INVITEs beyond
``sip_max_invites_per_second`` are held ``FLOOD_HOLD_SECONDS``, then refused 503, so that at most
``sip_max_calls`` hold RTP sockets at once. What reaches ``_incoming`` is well formed: the SIP guard
(``deploy/pjsua2/ext/sip_guard.hpp``) answered the rest. Session timers are pjsua's (``_make_account``); INVITEs
over TLS have an account of their own (``_TlsAccount``) because SRTP is an account's policy;
``sip_registrations`` are accounts too (``registration.py``).

Details: docs/sip.md (#the-call, #transports-tls-and-srtp, #trunk-authentication-digest-and-registration-register,
#session-timers-rfc-4028, #hostile-input-the-sip-guard-and-object-lifetimes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import re
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import unquote

import pjsua2 as pj

from personagate_common.tls import certificate_summary

from ..call.metrics import call_metrics
from ..call.recording import check_recordings_dir
from ..tenants.tenant import Rejection
from .auth import AuthDecision, AuthResult, DigestAuthenticator
from .inbound import InboundCall
from .leg import Leg
from .media import RINGBACK, PortMedia
from .metrics import SipMetrics
from .registration import RegistrationAccount
from .ua import TlsTransport, UaConfig, UserAgent, call_op, header

if TYPE_CHECKING:
    from ..calls import Calls
    from ..config import GatewaySettings
    from ..tenants.registry import TenantRegistry

log = logging.getLogger(__name__)

FLOOD_HOLD_SECONDS = 0.25  # an INVITE past sip_max_invites_per_second waits this long for its 503 (see above)
# At stop, how long REGISTER bindings may take to be removed (Expires: 0 answered) before the endpoint goes.
UNREGISTER_SECONDS = 3.0

_REQUEST_LINE = re.compile(r"^INVITE\s+(?:sips?|tel):([^@;>\s]+)", re.IGNORECASE)


def dialed_number(message: str) -> str | None:
    """The Request-URI's user part of an INVITE (``sip:+14155550186@host`` → ``+14155550186``), unescaped,
    with visual separators ('-', '.', '(', ')') removed as RFC 3966 allows."""
    match = _REQUEST_LINE.match(message)
    if match is None:
        return None
    user = unquote(match.group(1).split(";", 1)[0])
    return re.sub(r"[-.()]", "", user)


_TOP_VIA = re.compile(r"^(?:via|v)[ \t]*:[ \t]*SIP[ \t]*/[ \t]*2\.0[ \t]*/[ \t]*([A-Za-z]+)", re.IGNORECASE | re.MULTILINE)


def signalling_transport(message: str) -> str:
    """The transport a request came over, as its sender's top Via names it: ``udp``, ``tcp``, ``tls``, or ``other``
    (a metric label: never the sender's own text)."""
    match = _TOP_VIA.search(message.split("\r\n\r\n", 1)[0])
    name = match.group(1).lower() if match else "udp"
    return name if name in ("udp", "tcp", "tls") else "other"


def source_ip(address: str) -> str:
    """``"1.2.3.4:5060"`` / ``"[::1]:5060"`` → the address without the port."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    return host.strip("[]")


class AllowList:
    """Trunks admitted by source address (CIDRs)."""

    def __init__(self, networks: Sequence[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def __contains__(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks if net.version == ip.version)


class _Account(pj.Account):
    """The gateway's one account: no registration; every INVITE arrives here (pjsua thread)."""

    def __init__(self, server: SipServer) -> None:
        super().__init__()
        self.server = server

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        self.server._incoming(self, prm.callId, prm.rdata.wholeMsg, prm.rdata.srcAddress)


class _TlsAccount(_Account):
    """The trunks' account for INVITEs over TLS, bound to the TLS transport: pjsua gives an INVITE to the account of
    its transport first, so SRTP's keys are only ever exchanged where signalling is encrypted (pjsua thread)."""


class SipServer:
    def __init__(self, settings: GatewaySettings, registry: TenantRegistry, calls: Calls) -> None:
        self.settings = settings
        self.registry = registry
        self.calls = calls
        self.allow = AllowList(settings.sip_allow)
        self.ua: UserAgent | None = None
        self.port: int | None = None
        self.tls_port: int | None = None  # with SIP over TLS on
        self.active: dict[int, InboundCall] = {}
        self._idle = asyncio.Event()  # no call in progress
        self._idle.set()
        self.metrics = SipMetrics(calls.metrics.registry)
        self.call_metrics = call_metrics(calls.metrics.registry, "sip")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events_fd: int | None = None
        self._arrivals: deque[float] = deque()  # INVITEs in the last second (pjsua thread)
        users = {name: secret.get_secret_value() for name, secret in settings.sip_auth_users.items()}
        self.auth = DigestAuthenticator(settings.sip_auth_realm, users, algorithms=settings.sip_auth_algorithms,
                                        nonce_seconds=settings.sip_auth_nonce_seconds) if users else None
        self._registrations: list[str] = [r.name for r in settings.sip_registrations]  # ua.keep keys
        self.registered: dict[str, bool] = {}  # binding name → registered now (written on the pjsua thread)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        s = self.settings
        if s.recordings_dir is not None:
            await asyncio.to_thread(check_recordings_dir, s.recordings_dir)
        tls = TlsTransport(port=s.sip_tls_port, cert_file=str(s.sip_tls_cert_file), key_file=str(s.sip_tls_key_file),
                           ca_file=str(s.sip_tls_ca_file or ""), verify_client=s.sip_tls_ca_file is not None,
                           require_client_cert=s.sip_tls_require_client_cert,
                           min_version=s.sip_tls_min_version) if s.sip_tls_enabled else None
        self.ua = UserAgent(UaConfig(host=s.sip_host, port=s.sip_port, max_calls=s.sip_max_calls,
                                     log_level=s.sip_log_level, public_address=s.sip_public_address,
                                     max_message_bytes=s.sip_max_message_bytes, tls=tls),
                            make_account=self._make_account)
        self.port = await asyncio.to_thread(self.ua.start)
        # Agent calls' media ports (pj.AgentPort) post their events to one eventfd, read here on the loop.
        pj.agentPortSetRingback(b"".join(RINGBACK))
        self._events_fd = pj.agentPortEventFd()
        self._loop.add_reader(self._events_fd, self.ua.ports.dispatch)
        listening = f"udp and tcp {s.sip_host}:{self.port}"
        extra: dict[str, object] = {"srtp": s.sip_srtp, "srtp_insecure_signalling": s.sip_srtp_insecure_signalling}
        if tls is not None:
            self.tls_port = self.ua.tls_port
            listening += f", tls {s.sip_host}:{self.tls_port}"
            assert s.sip_tls_cert_file is not None
            cert = certificate_summary(s.sip_tls_cert_file)
            extra |= {"tls_certificate": cert.subject, "tls_certificate_expires": cert.not_after.isoformat(),
                      "tls_client_certificates": "required" if s.sip_tls_require_client_cert else
                      "verified when presented" if s.sip_tls_ca_file else "not verified",
                      "tls_min_version": s.sip_tls_min_version}
            if cert.expired:
                log.warning("the SIP TLS certificate %r expired on %s: TLS peers that verify it will refuse it",
                            cert.subject, cert.not_after.isoformat(), extra={"file": str(s.sip_tls_cert_file)})
        log.info("SIP listening on %s", listening, extra={
            "allow": s.sip_allow, "auth_policy": s.sip_auth_policy, "auth_users": len(s.sip_auth_users),
            "registrations": self._registrations, **extra})
        if s.sip_registrations:
            await asyncio.wrap_future(self.ua.submit(self._register))

    async def stop(self) -> None:
        await asyncio.gather(*(call.stop() for call in list(self.active.values())))  # each: BYE or 503, at once
        if self._events_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._events_fd)
            self._events_fd = None
        if self.ua is not None:
            await self._unregister()
            await asyncio.to_thread(self.ua.stop)
            self.ua = None

    async def wait_idle(self, seconds: float) -> bool:
        """Until no call is in progress (True), or ``seconds`` pass (False). A drain waits here for the calls
        with no agent session left — caller and human bridged after an escalation — once agent calls ended."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self._idle.wait()
        return self._idle.is_set()

    def _register(self) -> None:
        assert self.ua is not None and self.ua.ep is not None
        ep = self.ua.ep
        # The transport's published address ("host:port"): with sip_host 0.0.0.0 pjsua publishes an interface's.
        local = ep.transportGetInfo(ep.transportEnum()[0]).localName
        for index, registration in enumerate(self.settings.sip_registrations, 1):
            account = RegistrationAccount(registration, self.metrics, self._incoming, self.registered,
                                          self._retry_registration_later)
            self.ua.keep(("registration", registration.name), account)
            account.start(local, functools.partial(self._configure_media, account=index))

    def _retry_registration_later(self, name: str, delay: float) -> None:
        """(pjsua thread) In ``delay`` seconds, ``RegistrationAccount.retry`` on the pjsua thread."""
        assert self.ua is not None and self._loop is not None
        ua = self.ua

        def retry() -> None:
            account = ua.kept(("registration", name))
            if isinstance(account, RegistrationAccount):
                account.retry()

        self._loop.call_soon_threadsafe(self._loop.call_later, delay, ua.post, retry)

    async def _unregister(self) -> None:
        """REGISTER with Expires: 0 for every binding; wait (a little) for the registrars' answers."""
        ua = self.ua
        assert ua is not None
        if not any(self.registered.values()):
            return
        names = list(self._registrations)

        def unregister() -> None:  # the accounts are only touched on the pjsua thread
            for name in names:
                account = ua.kept(("registration", name))
                if isinstance(account, RegistrationAccount):
                    account.unregister()

        await asyncio.wrap_future(ua.submit(unregister))
        deadline = time.monotonic() + UNREGISTER_SECONDS
        while any(self.registered.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _make_account(self, ua: UserAgent) -> pj.Account:
        """The trunks' account (UDP and TCP), and with TLS on the TLS trunks' (kept on the user agent): two, because
        SRTP's policy is an account's, and over TLS it may differ (``_configure_srtp``). The TLS account is bound to
        the TLS transport and ranks first, so pjsua hands it every INVITE that came over TLS (an account whose
        transport matches the INVITE's wins) and the other account every other."""
        s = self.settings
        if "tls" in ua.transports:
            tls_account = _TlsAccount(self)
            cfg = self._account_config(ua, rtp_share=s.sip_accounts - 1, secure=True)
            cfg.sipConfig.transportId = ua.transports["tls"]
            cfg.priority = 1
            tls_account.create(cfg, False)
            ua.keep(("account", "tls"), tls_account)
        account = _Account(self)
        account.create(self._account_config(ua, rtp_share=0, secure=False), True)
        return account

    def _account_config(self, ua: UserAgent, *, rtp_share: int, secure: bool) -> pj.AccountConfig:
        cfg = pj.AccountConfig()
        s = self.settings
        cfg.idUri = f"sip:personagate@{s.sip_public_address or s.sip_host}:{ua.config.port or 5060}"
        self._configure_media(cfg, rtp_share, secure=secure)
        # pjsua would otherwise connect to a TCP or TLS caller's Contact as soon as its INVITE arrives, before the INVITE
        # is admitted, only to put that connection's port in the Via of later requests: any INVITE could make the
        # gateway connect wherever its Contact says. The Via names the listening port instead; responses go back on
        # the connection each request came on either way.
        cfg.natConfig.contactUseSrcPort = False
        # RFC 4028 session timers when the caller supports them (pjsip runs them: a caller that refreshes
        # neither by re-INVITE nor UPDATE gets BYE before the session expires; Session-Expires below Min-SE: 422).
        cfg.callConfig.timerUse = pj.PJSUA_SIP_TIMER_OPTIONAL
        cfg.callConfig.timerSessExpiresSec = s.sip_session_expires_seconds
        cfg.callConfig.timerMinSESec = s.sip_min_se_seconds
        return cfg

    def _configure_media(self, cfg: pj.AccountConfig, account: int = 0, *, secure: bool = False) -> None:
        """An account's RTP sockets: bound to ``sip_host``; a pair per call from ``sip_rtp_port`` upwards, wrapping
        within ``sip_rtp_port_range`` (pjsua's port_range), so a firewall or a host-network pod opens exactly that
        range (0: pjsua's own, 4000 upwards); ``sip_public_address`` in the SDP's c= line, where callers send RTP.
        Each account (0: the trunks'; 1…: ``sip_registrations``; then the TLS trunks') walks its own share of the
        range: pjsua keeps a next-port counter per account and gives up after 100 busy pairs, so accounts sharing
        one range would collide (``GatewaySettings.rtp_port_share``). ``secure``: its calls come over TLS (SRTP)."""
        s = self.settings
        self._configure_srtp(cfg.mediaConfig, secure)
        media = cfg.mediaConfig.transportConfig
        media.boundAddress = s.sip_host
        if s.sip_rtp_port:
            first, ports = s.rtp_port_share(account)
            media.port = first
            # pjsua wraps back to the first port only once the next RTP port is *past* port + portRange, so its
            # last pair is port + portRange, +1: two ports beyond. Our range counts the ports themselves.
            media.portRange = ports - 2 if ports else 0
        if s.sip_public_address:
            media.publicAddress = s.sip_public_address

    def _configure_srtp(self, media: pj.AccountMediaConfig, secure: bool) -> None:
        """SRTP by ``sip_srtp``, keyed by SDES only (RFC 4568: keys in the SDP, so only as safe as the signalling).
        Over TLS (``secure``), or anywhere with ``sip_srtp_insecure_signalling``, the setting applies as it is.
        Otherwise the keys would cross the network in clear, so such an account has no SRTP at all: an offer of
        SRTP alone (RTP/SAVP) is refused 488 by pjsua (no common media), one of RTP/AVP with keys gets plain RTP,
        and with ``mandatory`` every INVITE that reaches the gateway is refused 488 (``_srtp_refusal``). (pjsua's own
        secure-signalling check would refuse those 406 Not Acceptable, which is about Accept headers.)"""
        s = self.settings
        use = {"off": pj.PJMEDIA_SRTP_DISABLED, "optional": pj.PJMEDIA_SRTP_OPTIONAL,
               "mandatory": pj.PJMEDIA_SRTP_MANDATORY}[s.sip_srtp]
        if not (secure or s.sip_srtp_insecure_signalling):
            use = pj.PJMEDIA_SRTP_DISABLED
        media.srtpUse = use
        # pjsua's levels: 0 any signalling, 1 TLS to the next hop, 2 sips: end to end.
        media.srtpSecureSignaling = 0 if s.sip_srtp_insecure_signalling else 1
        media.srtpOpt.keyings = pj.IntVector([pj.PJMEDIA_SRTP_KEYING_SDES])

    # ------------------------------------------------------------------ the pjsua thread

    def _incoming(self, account: pj.Account, call_index: int, message: str, source: str) -> None:
        assert self.ua is not None and self._loop is not None
        leg = Leg(self.ua, account, call_index,
                  buffers=PortMedia(cushion_packets=self.settings.sip_outbound_cushion_packets))
        self.ua.keep(leg.serial, leg)
        sip_call_id = leg.getInfo().callIdString
        ip = source_ip(source)
        number = dialed_number(message)
        if self._flooded():
            return self._shed(leg, number, sip_call_id)
        refusal = self._admission(message, ip)
        if refusal is not None:
            status, why, stale = refusal
            if status == 401:
                return self._challenge(leg, why, stale, number, sip_call_id)
            return self._refuse(leg, status, "Forbidden", why, number, sip_call_id)
        # The TLS account takes exactly the INVITEs that came over TLS; otherwise the sender's Via says which.
        transport = "tls" if isinstance(account, _TlsAccount) else signalling_transport(message)
        why = self._srtp_refusal(account, transport)
        if why is not None:
            return self._refuse(leg, 488, "Not Acceptable Here", why, number, sip_call_id)
        if number is None:
            return self._refuse(leg, 404, "Not Found", "no number in the Request-URI", number, sip_call_id)
        routed = self.registry.route(number)
        if routed is None:
            return self._refuse(leg, 404, "Not Found", "no tenant has this number", number, sip_call_id)
        tenant, answer = routed
        if isinstance(answer, Rejection):
            return self._refuse(leg, answer.status, answer.reason, f"{tenant.id}: after hours", number, sip_call_id)
        leg.respond(180, "Ringing")
        call = InboundCall(ua=self.ua, leg=leg, sip_call_id=sip_call_id, number=number, caller=source,
                           tenant=tenant, persona=answer, calls=self.calls,
                           answer_timeout=self.settings.sip_answer_timeout_seconds,
                           retry_after=self.settings.sip_retry_after_seconds,
                           media_timeout=self.settings.sip_media_timeout_seconds,
                           max_call_seconds=self.settings.sip_max_call_seconds, loop=self._loop,
                           metrics=self.metrics, call_metrics=self.call_metrics, bridge_fallback=self.settings.sip_transfer_bridge_fallback,
                           ring_timeout=self.settings.sip_transfer_ring_seconds,
                           recordings_dir=self.settings.recordings_dir,
                           caller_first_wait=self.settings.sip_caller_first_wait_seconds,
                           ringing_interval=self.settings.sip_ringing_interval_seconds, transport=transport)
        self._loop.call_soon_threadsafe(self._begin, call)

    def _admission(self, message: str, ip: str) -> tuple[int, str, bool] | None:
        """None to admit the INVITE, else (401 or 403, why, stale) by ``sip_auth_policy``
        (docs/sip.md#admitting-invites-sip_auth_policy)."""
        allowed = ip in self.allow
        policy = self.settings.sip_auth_policy
        if self.auth is None or (policy == "allow_or_digest" and allowed):
            return None if allowed else (403, f"source {ip} is not in sip_allow", False)
        if policy == "allow_and_digest" and not allowed:
            return 403, f"source {ip} is not in sip_allow", False
        decision = self.auth.verify(message, "INVITE", ip)
        self.metrics.auth.labels(result=decision.result.value).inc()
        if decision.admitted:
            log.info("INVITE authenticated", extra={"trunk_user": decision.username, "source": ip,
                                                    "algorithm": decision.algorithm})
            return None
        return decision.status, self._auth_why(decision), decision.result is AuthResult.STALE

    def _srtp_refusal(self, account: pj.Account, transport: str) -> str | None:
        """Why an admitted INVITE is refused 488 for SRTP's sake, or None: with ``sip_srtp`` mandatory, one that did
        not come over TLS, unless ``sip_srtp_insecure_signalling`` lets its keys cross in clear. (One that did, but
        offers no SRTP, never gets here: pjsua refuses it 488 itself, as media it cannot accept.)"""
        s = self.settings
        if s.sip_srtp != "mandatory" or s.sip_srtp_insecure_signalling or isinstance(account, _TlsAccount):
            return None
        return (f"sip_srtp is mandatory and this INVITE came over {transport}: its SRTP keys would cross the network in "
                "clear (only TLS may carry them unless sip_srtp_insecure_signalling)")

    @staticmethod
    def _auth_why(decision: AuthDecision) -> str:
        who = f" (user {decision.username[:64]!r})" if decision.username else ""
        return f"digest {decision.result.value}{who}: {decision.why}"

    def _challenge(self, leg: Leg, why: str, stale: bool, number: str | None, sip_call_id: str) -> None:
        """401 with one WWW-Authenticate per offered algorithm (a dict of headers cannot hold two)."""
        assert self.auth is not None
        prm = call_op(401, "Unauthorized")
        for value in self.auth.challenges(stale=stale):
            prm.txOption.headers.append(header("WWW-Authenticate", value))
        leg.refuse(prm)
        self.metrics.invites.labels(answer="401").inc()
        log.info("INVITE challenged: 401", extra={"sip_call_id": sip_call_id, "number": number, "why": why})

    def _flooded(self) -> bool:
        now = time.monotonic()
        while self._arrivals and self._arrivals[0] < now - 1.0:
            self._arrivals.popleft()
        if len(self._arrivals) >= self.settings.sip_max_invites_per_second:
            return True
        self._arrivals.append(now)
        return False

    def _shed(self, leg: Leg, number: str | None, sip_call_id: str) -> None:
        """503 after ``FLOOD_HOLD_SECONDS``: meanwhile the call holds its slot in pjsua's table."""
        assert self.ua is not None and self._loop is not None
        self.metrics.invites_shed.inc()
        self.metrics.invites.labels(answer="503").inc()
        retry = {"Retry-After": str(max(1, round(self.settings.sip_retry_after_seconds)))}
        ua, serial = self.ua, leg.serial  # the loop side keeps the serial only: the leg lives on the pjsua thread

        def respond() -> None:
            held = ua.kept(serial)
            if isinstance(held, Leg):
                held.respond(503, "Service Unavailable", retry)

        self._loop.call_soon_threadsafe(self._loop.call_later, FLOOD_HOLD_SECONDS, ua.post, respond)
        log.info("INVITE refused: 503, more than %d INVITEs in a second", self.settings.sip_max_invites_per_second,
                 extra={"sip_call_id": sip_call_id, "number": number, "why": "flood"})

    def _refuse(self, leg: Leg, status: int, reason: str, why: str, number: str | None, sip_call_id: str) -> None:
        leg.refuse(call_op(status, reason))
        self.metrics.invites.labels(answer=str(status)).inc()
        log.info("INVITE refused: %d %s", status, reason, extra={
            "sip_call_id": sip_call_id, "number": number, "why": why})

    # ------------------------------------------------------------------ the event loop

    def _begin(self, call: InboundCall) -> None:
        self.active[call.leg_serial] = call
        self._idle.clear()
        self.call_metrics.calls_active.set(len(self.active))
        call.begin()
        assert call.task is not None
        call.task.add_done_callback(lambda _: self._done(call))

    def _done(self, call: InboundCall) -> None:
        self.active.pop(call.leg_serial, None)
        self.call_metrics.calls_active.set(len(self.active))
        if not self.active:
            self._idle.set()
