"""REGISTER bindings at PBXs or carriers (``sip_registrations``): one pjsua2 Account each, on the pjsua thread.

pjsua does the protocol: the REGISTER with the configured Expires, the digest answer to the registrar's 401/407
(``sipConfig.authCreds``), the refresh shortly before expiry, a new attempt ``retry_seconds`` after a temporary
failure (``regConfig.retryIntervalSec``: no answer, 408, 480, 5xx, 6xx), and REGISTER with Expires: 0 when the
gateway stops (``unregister``). pjsua gives up for good on any other refusal (403 for wrong credentials, 404,
...), so then this module asks again itself, ``refused_retry_seconds`` later (longer by default: a registrar may
block an address that keeps failing). It reports: ``personagate_gateway_sip_registered{registration}`` (1 while registered),
``personagate_gateway_sip_registrations_total{registration,result}``, and a log line per change.

An INVITE the registrar sends to the registered Contact arrives on the binding's account and is handed to the
same ``SipServer._incoming`` as every other INVITE: the same source and digest checks, the Request-URI's user
as the dialed number (``contact_user`` puts the DID there), the same tenant routing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pjsua2 as pj

from ..config import SipRegistration
from .metrics import SipMetrics

log = logging.getLogger(__name__)

IncomingHandler = Callable[[pj.Account, int, str, str], None]

# The final answers after which pjsua schedules the next attempt itself (pjsua_acc.c, regc_cb).
PJSUA_RETRIES = frozenset({408, 480, 500, 502, 503, 504})


class RegistrationAccount(pj.Account):
    """One binding. Made, told and dropped on the pjsua thread only (keep it with ``ua.keep``)."""

    def __init__(self, registration: SipRegistration, metrics: SipMetrics, incoming: IncomingHandler,
                 states: dict[str, bool], retry_later: Callable[[str, float], None]) -> None:
        super().__init__()
        self.states = states  # name → registered, read by the server's stop on the event loop
        self.retry_later = retry_later  # (name, seconds): the server calls ``retry`` on this thread then
        self.stopping = False
        self.registration = registration
        self.metrics = metrics
        self.incoming = incoming
        self.registered = False
        self.last_status = 0
        self.metrics.registered.labels(registration=registration.name).set(0)
        self.states[registration.name] = False

    def start(self, local: str, configure_media: Callable[[pj.AccountConfig], None]) -> None:
        """Create the account: it registers at once. ``local`` is our SIP ``host:port`` (for a forced Contact);
        ``configure_media`` sets its calls' RTP sockets as the main account's (address, port range, SDP address)."""
        r = self.registration
        cfg = pj.AccountConfig()
        configure_media(cfg)
        cfg.idUri = r.aor
        cfg.regConfig.registrarUri = r.registrar
        cfg.regConfig.registerOnAdd = True
        cfg.regConfig.timeoutSec = r.expiry_seconds
        cfg.regConfig.retryIntervalSec = r.retry_seconds
        cfg.regConfig.firstRetryIntervalSec = r.retry_seconds
        cfg.regConfig.dropCallsOnFail = False  # calls in progress outlive a failed refresh
        cfg.sipConfig.authCreds.append(
            pj.AuthCredInfo("digest", r.realm, r.username, pj.PJSIP_CRED_DATA_PLAIN_PASSWD,
                            r.password.get_secret_value()))
        if r.contact_user:
            cfg.sipConfig.contactForced = f"<sip:{r.contact_user}@{local}>"
        cfg.callConfig.timerUse = pj.PJSUA_SIP_TIMER_OPTIONAL
        self.create(cfg, True)
        log.info("SIP registering", extra={"registration": r.name, "registrar": r.registrar,
                                           "expiry_seconds": r.expiry_seconds})

    def onRegState(self, prm: pj.OnRegStateParam) -> None:
        name = self.registration.name
        ok = prm.code // 100 == 2
        registered = ok and prm.expiration > 0
        if ok and not registered:
            self.metrics.registrations.labels(registration=name, result="unregistered").inc()
        else:
            self.metrics.registrations.labels(registration=name, result="ok" if ok else "failed").inc()
        self.metrics.registered.labels(registration=name).set(1 if registered else 0)
        changed = registered != self.registered or prm.code != self.last_status
        self.registered, self.last_status = registered, prm.code
        self.states[name] = registered
        extra = {"registration": name, "status": prm.code, "reason": prm.reason, "expires": prm.expiration}
        if registered:
            (log.info if changed else log.debug)("SIP registered", extra=extra)
        elif ok:
            log.info("SIP unregistered", extra=extra)
        else:
            pjsua_retries = prm.code in PJSUA_RETRIES or prm.code >= 600 or prm.code < 100
            delay = self.registration.retry_seconds if pjsua_retries else self.registration.refused_retry_seconds
            log.warning("SIP registration failed; retrying in %d s", delay, extra=extra)
            if not pjsua_retries and not self.stopping:
                self.retry_later(name, delay)

    def retry(self) -> None:
        """Register again after a refusal pjsua does not retry."""
        if not self.stopping and not self.registered:
            try:
                self.setRegistration(True)
            except pj.Error as exc:
                log.warning("SIP registration not sent", extra={"registration": self.registration.name,
                                                                "error": exc.reason})

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        self.incoming(self, prm.callId, prm.rdata.wholeMsg, prm.rdata.srcAddress)

    def unregister(self) -> None:
        self.stopping = True
        if self.registered:
            try:
                self.setRegistration(False)
            except pj.Error as exc:
                log.warning("SIP unregister failed", extra={"registration": self.registration.name,
                                                            "error": exc.reason})
