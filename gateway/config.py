"""Gateway settings: read from a YAML file, then the environment (``PERSONAGATE_GATEWAY_*``), then the
command line (each overriding the one before), validated at start."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import SettingsConfigDict

from personagate_common.bounded_yaml import describe, load_yaml
from personagate_common.plane import WorkerAuth, check_ca_file, check_secret, check_server_tls, read_secrets
from personagate_common.routing.redis_store import RedisPrefixSetting, RedisUrlSetting
from personagate_common.settings_files import LayeredSettings, SettingsError, load_settings

from .tenants.loader import MAX_CLIP_BYTES

__all__ = ["GatewaySettings", "IceServer", "SettingsError", "SipRegistration", "load_gateway_settings"]

_SIP_URI = re.compile(r"^sips?:(?:[^@\s]+@)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?(?:;[^\s]*)?$")
_SIP_USER = re.compile(r"^[A-Za-z0-9+\-_.!~*'()&=$,;?/%]{1,64}$")  # RFC 3261's user (unreserved / escaped)


class SipRegistration(BaseModel):
    """One REGISTER binding the gateway keeps at a PBX or carrier (``sip_registrations``)."""

    model_config = ConfigDict(extra="forbid")

    registrar: str = Field(description="the registrar's SIP URI, e.g. sip:pbx.example.com or sip:10.0.0.5:5060")
    username: str = Field(min_length=1, max_length=128, description="the digest username")
    password: SecretStr = Field(description="the digest password (never logged)")
    realm: str = Field("*", min_length=1, description="the realm the credentials are for; '*': any the registrar names")
    user: str | None = Field(None, description="the user part of the registered address of record; default: username")
    contact_user: str | None = Field(
        None, description="the user part of the Contact the registrar sends INVITEs to, e.g. the DID, so that "
                          "their Request-URI carries the dialed number; default: pjsua's own (the AOR's user)")
    expiry_seconds: int = Field(300, ge=30, le=86_400, description="the Expires asked for; pjsua refreshes before it")
    retry_seconds: int = Field(
        30, ge=5, le=3600, description="after a temporary failure (no answer, 408, 480, 5xx, 6xx), try again this "
                                       "much later")
    refused_retry_seconds: int = Field(
        300, ge=5, le=86_400, description="after a refusal (403 wrong credentials, 404, other 4xx), try again this "
                                          "much later")

    @field_validator("registrar")
    @classmethod
    def _registrar(cls, uri: str) -> str:
        if not _SIP_URI.match(uri):
            raise ValueError(f"registrar must be a sip: or sips: URI such as sip:pbx.example.com:5060, got {uri!r}")
        return uri

    @field_validator("user", "contact_user")
    @classmethod
    def _user(cls, user: str | None) -> str | None:
        if user is not None and not _SIP_USER.match(user):
            raise ValueError(f"{user!r} is not a SIP user part (letters, digits, +-_.!~*'()&=$,;?/%; at most 64)")
        return user

    @property
    def registrar_host(self) -> str:
        match = _SIP_URI.match(self.registrar)
        assert match is not None
        return match.group(1) + (f":{match.group(2)}" if match.group(2) else "")

    @property
    def aor(self) -> str:
        """The address of record: ``sip:user@registrar-host``."""
        scheme = self.registrar.split(":", 1)[0]
        return f"{scheme}:{self.user or self.username}@{self.registrar_host}"

    @property
    def name(self) -> str:
        """How logs and the ``registration`` metric label call it: ``user@registrar-host``."""
        return f"{self.user or self.username}@{self.registrar_host}"



class IceServer(BaseModel):
    """A STUN or TURN server for WebRTC calls (``webrtc_ice_servers``): given to the gateway's own ICE agent and
    to the browser page, as ``RTCIceServer``."""

    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(min_length=1, description="stun:host:port, turn:host:port?transport=udp|tcp, or turns:")
    username: str | None = Field(None, description="a static TURN username; unset with webrtc_turn_secret: minted")
    credential: SecretStr | None = Field(None, description="a static TURN password (a secret)")

    @field_validator("urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        from .webrtc.ice import check_ice_server_url

        for url in urls:
            check_ice_server_url(url)
        return urls

class GatewaySettings(LayeredSettings):
    what: ClassVar[str] = "gateway"
    model_config = SettingsConfigDict(env_prefix="PERSONAGATE_GATEWAY_", env_nested_delimiter="__", extra="forbid")
    _worker_secret: str | None = PrivateAttr(None)  # worker_secret, or worker_secret_file's, checked

    host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535, description="the HTTP port: admin API, probes, metrics")
    forwarded_allow_ips: list[str] = Field(
        ["127.0.0.1"], description="peers whose X-Forwarded-For (and X-Forwarded-Proto) is believed, as addresses "
                                   "or CIDRs: your Ingress controller's or load balancer's (e.g. the pod network's "
                                   "CIDR). A request from one of them counts as its forwarded client in the "
                                   "per-client limits (browser offers, failed admin logins) and in the logs; from "
                                   "any other peer the header is ignored and the peer is the client. Empty: trust "
                                   "none. Replaces uvicorn's FORWARDED_ALLOW_IPS, which is not read")
    tenants_dir: Path = Field(Path("tenants"), description="the folder of tenant folders (<id>/tenant.yaml)")
    # A tenant change serves new calls within 5 s (docs/tenants.md#hot-reload); the poll is one part of that.
    tenants_poll_seconds: float = Field(1.0, gt=0, le=4, description="how often the tenants folder is checked")
    admin_tokens_file: Path | None = Field(
        None, description="YAML file of SHA-256 hashes of admin API tokens; without it the admin API is off")
    max_clip_bytes: int = Field(5_000_000, ge=1024, le=MAX_CLIP_BYTES, description="largest voice clip upload")
    history_versions: int = Field(50, ge=1, le=10_000, description="versions kept per file in a tenant's history")
    # Failed-login throttling and the audit log (gateway/admin/throttle.py, gateway/admin/audit.py).
    admin_auth_failure_burst: int = Field(
        10, ge=1, le=10_000, description="wrong bearer tokens one client address (IPv4, or IPv6 /64), and separately "
                                         "one token prefix, may send at once; past that, every attempt is refused "
                                         "with 429 and Retry-After until the throttle forgives a failure")
    admin_auth_failures_per_minute: float = Field(
        6.0, gt=0, le=10_000, description="after the burst: wrong tokens forgiven per minute, per client address and "
                                          "per token prefix")
    admin_auth_tracked_keys: int = Field(
        10_000, ge=100, le=1_000_000, description="client addresses, and token prefixes, the throttle remembers "
                                                  "(each; those that have waited out their penalty go first)")
    admin_audit_entries: int = Field(
        10_000, ge=100, le=1_000_000, description="admin API write attempts kept in the audit log (GET "
                                                  "/v1/admin/audit); refused logins are kept apart, a tenth as many")
    # Calls and routing (gateway/calls.py, personagate_common/routing/).
    redis_url: RedisUrlSetting = Field(
        None, description="the routing Redis shared by gateways and workers: redis://, rediss://, unix:// or "
                          "redis+sentinel:// URL; unset: the embedded store (one machine; the gateway polls `workers`)")
    redis_prefix: RedisPrefixSetting = Field("{pg}", description="key prefix in Redis, a hash tag; the same as the workers'")
    workers: list[str] = Field(
        ["http://127.0.0.1:8765"], min_length=1,
        description="without redis_url: the workers' HTTP base URLs, whose /v1/info the gateway reads every second")
    ready_without_routing_store: bool = Field(
        True, description="keep /readyz 200 while the routing store (Redis) cannot be reached, new calls meanwhile "
                          "answered 503 with Retry-After (SIP and browser) and the store's state in /readyz's "
                          "routing_store and personagate_gateway_routing_store_reachable: a Redis failover then "
                          "does not take every gateway out of its load balancer at once (INVITEs time out instead of "
                          "being refused). false: /readyz answers 503 while the store cannot be reached")
    pod_deletion_cost: bool = Field(
        False, description="keep controller.kubernetes.io/pod-deletion-cost on this gateway's own pod equal to its "
                           "calls in progress, so that a scale-in deletes the idlest gateway first; needs the "
                           "in-cluster credentials, POD_NAME and POD_NAMESPACE (deploy/k8s/components/"
                           "pod-deletion-cost)")
    call_lease_seconds: float = Field(
        15.0, ge=3, le=3600, description="a call's lease in the routing store; renewed every third of it")
    worker_ttl_seconds: float = Field(
        3.0, ge=2, le=600, description="without redis_url: how long one /v1/info reading keeps a worker alive")
    drain_seconds: float = Field(
        3600.0, ge=0, description="on SIGTERM: how long calls in progress may go on before they are ended")
    # The internal plane (personagate_common/plane.py, docs/deploy.md): the gateway's credential towards workers,
    # TLS to them, TLS on its own HTTP listener, and the admin API on a listener of its own.
    worker_secret: SecretStr | None = Field(
        None, description="the shared secret sent to workers (Authorization: Bearer) on every session and /v1/info "
                          "poll: one of the workers' session secrets")
    worker_secret_file: Path | None = Field(
        None, description="a file holding worker_secret (its first line), e.g. a Kubernetes Secret mounted as a file")
    worker_tls_ca_file: Path | None = Field(
        None, description="PEM CA certificates that wss:// and https:// workers' certificates must chain to; unset: "
                          "the system's CAs")
    http_tls_cert_file: Path | None = Field(
        None, description="the HTTP listener's TLS certificate, PEM (chain may follow); with http_tls_key_file the "
                          "gateway serves https:// only (the admin listener too)")
    http_tls_key_file: Path | None = Field(None, description="the certificate's private key, PEM, unencrypted")
    admin_host: str | None = Field(
        None, description="the admin API's own listen address (with admin_port); default: host")
    admin_port: int | None = Field(
        None, ge=0, le=65535, description="a port of its own for the admin API (/v1/admin, /docs): then it is not "
                                          "served on http_port, which an Ingress may expose for browser calls; "
                                          "unset: the admin API is on http_port")
    # SIP front end (gateway/sip/).
    sip_enabled: bool = Field(False, description="answer SIP calls (UDP and TCP on sip_host:sip_port, TLS on "
                                                 "sip_tls_port); 'personagate up' turns it on")
    sip_host: str = Field("127.0.0.1", description="the SIP (UDP, TCP, TLS) and RTP listen address")
    sip_port: int = Field(5060, ge=0, le=65535, description="the SIP port, UDP and TCP alike (0: any free port)")
    # SIP over TLS and SRTP (docs/sip.md, "Transports, TLS and SRTP").
    sip_tls_port: int = Field(5061, ge=0, le=65535, description="the SIP over TLS port (TCP), listening when "
                                                                "sip_tls_cert_file and sip_tls_key_file are set")
    sip_tls_cert_file: Path | None = Field(
        None, description="the gateway's TLS certificate, PEM (its chain may follow it in the file); with "
                          "sip_tls_key_file it turns SIP over TLS on")
    sip_tls_key_file: Path | None = Field(None, description="the certificate's private key, PEM, unencrypted")
    sip_tls_ca_file: Path | None = Field(
        None, description="PEM CA certificates that trunks' client certificates must chain to: a client presenting "
                          "a certificate they do not vouch for is refused (see sip_tls_require_client_cert)")
    sip_tls_require_client_cert: bool = Field(
        False, description="mutual TLS: a TLS connection without a client certificate that sip_tls_ca_file vouches "
                           "for is refused")
    sip_tls_min_version: Literal["1.2", "1.3"] = Field("1.2", description="the oldest TLS version accepted")
    sip_srtp: Literal["off", "optional", "mandatory"] = Field(
        "optional", description="SRTP with SDES keys (RFC 4568): optional: SRTP for a caller that offers it, plain "
                                "RTP otherwise; mandatory: a call without SRTP is refused 488; off: plain RTP only "
                                "(an offer of SRTP alone is refused 488). SDES keys travel in the SDP, so by default "
                                "only calls over TLS get SRTP (sip_srtp_insecure_signalling)")
    sip_srtp_insecure_signalling: bool = Field(
        False, description="also use SRTP on calls signalled over UDP or TCP, whose SDES keys anyone on the path can "
                           "read (RFC 4568 wants secure signalling); off: such calls get plain RTP, or 488 with "
                           "sip_srtp mandatory")
    sip_public_address: str | None = Field(
        None, description="the address other parties reach this gateway at, written into SDP (c=) and the SIP "
                          "Contact/Via instead of the bound one: a NAT 1:1 address, or the node's IP when "
                          "sip_host is 0.0.0.0; unset: the bound address (with 0.0.0.0, one pjsua picks)")
    sip_rtp_port: int = Field(
        0, ge=0, le=65534, description="the first RTP port (even; RTP and RTCP take a pair per call, counting up); "
                                       "0: pjsua's default, 4000 upwards with no bound")
    sip_rtp_port_range: int = Field(
        0, ge=0, le=65535, description="how many ports from sip_rtp_port calls' RTP/RTCP may use (2 a call), so a "
                                       "firewall or a host-network pod can open exactly these; 0: no bound. Needs "
                                       "sip_rtp_port and room for sip_max_calls calls")
    sip_allow: list[str] = Field(
        ["127.0.0.0/8", "::1/128"],
        description="trunks admitted by source address (CIDRs); INVITEs from elsewhere get 403")
    sip_max_calls: int = Field(
        256, ge=1, le=512, description="pjsua's call table (at most PJSUA_MAX_CALLS, 512 in deploy/pjsua2's build); "
                                       "an INVITE past it is answered 486 by pjsua itself")
    sip_max_message_bytes: int = Field(
        16_384, ge=1_500, le=65_000, description="the largest SIP request taken, over UDP or TCP; a larger one is answered "
                                                 "513 Message Too Large (the build reads up to 64 KB)")
    sip_max_invites_per_second: int = Field(
        10, ge=1, le=10_000, description="INVITEs handled in any one second; more are held 250 ms and refused 503 with "
                                         "Retry-After")
    sip_outbound_cushion_packets: int = Field(
        1, ge=0, le=4, description="20 ms packets of agent audio the outbound buffer may keep against the worker's "
                                   "jitter: each adds up to 20 ms to what the caller hears; 0 is the least latency, "
                                   "with a gap whenever an agent frame is late (watch "
                                   "personagate_gateway_front_end_outbound_underruns_total)")
    sip_answer_timeout_seconds: float = Field(
        20.0, gt=0, le=300, description="from INVITE to a primed session; later → 503 with Retry-After")
    sip_retry_after_seconds: float = Field(5.0, ge=1, le=3600, description="Retry-After on a 503 for a priming timeout")
    sip_media_timeout_seconds: float = Field(
        30.0, ge=1, le=3600, description="an answered call with no RTP from the caller this long is hung up (BYE)")
    sip_max_call_seconds: float | None = Field(
        None, gt=0, description="a cap on every call's duration from the answer, below the tenants' own "
                                "limits.max_call_seconds (which always apply); unset: the tenants' limits only")
    sip_transfer_bridge_fallback: bool = Field(
        True, description="when the escalation REFER is refused or fails, call the tenant's escalation.transfer_to "
                          "from the gateway and bridge the caller to whoever answers (the agent is released)")
    sip_transfer_ring_seconds: float = Field(
        30.0, gt=0, le=300, description="how long the gateway's call to the escalation target may ring before it is "
                                        "cancelled and the caller stays with the agent")
    sip_caller_first_wait_seconds: float | None = Field(
        5.0, gt=0, le=300, description="for a persona with speaks_first: false, how long the agent waits for the "
                                       "caller to speak before it speaks anyway, so a caller who waits for a greeting "
                                       "is not left in silence; unset: it waits as long as the call lasts")
    recordings_dir: Path | None = Field(
        None, description="where recordings of calls to tenants with recording.enabled are written "
                          "(<tenant>/<date>/<time>-<call id>.flac, stereo: caller left, agent right), made if missing "
                          "and checked writable at start; unset: no call is recorded and no consent announcement is "
                          "played, whatever the tenants say")
    sip_ringing_interval_seconds: float = Field(
        1.0, ge=0.2, le=60, description="while a call's session is primed, 183 Session Progress is sent again this "
                                        "often, so proxies do not cancel a quiet INVITE and a lost 183 is repaired")
    sip_session_expires_seconds: int = Field(
        1800, ge=90, le=86400, description="RFC 4028 session timer: the Session-Expires the gateway asks for when a "
                                           "caller supports timers; a caller may ask for less, down to sip_min_se_seconds")
    sip_min_se_seconds: int = Field(
        90, ge=90, le=86400, description="RFC 4028 Min-SE: a caller's Session-Expires below it gets 422 with this "
                                         "Min-SE (90 is the RFC's and pjsip's floor)")
    # WebRTC front end (gateway/webrtc/): browser calls, signalled over this HTTP port.
    webrtc_enabled: bool = Field(True, description="take browser calls: the page at /call and its signalling API "
                                                   "under /v1/webrtc")
    webrtc_max_offer_bytes: int = Field(
        16_384, ge=1024, le=262_144, description="the largest SDP offer accepted (a browser's audio offer with a data "
                                                 "channel is 2-5 KB); larger → 413")
    webrtc_offers_per_minute: int = Field(
        20, ge=1, le=10_000, description="SDP offers one client address may post per minute without a token (a "
                                         "burst of a third of it at once); more → 429 with Retry-After. Offers with a "
                                         "valid admin token are not counted")
    webrtc_public_calls_per_tenant: int = Field(
        4, ge=1, le=10_000, description="anonymous (public-link, no token) browser calls one tenant may have in "
                                        "progress on this gateway, offers being answered included, and never more "
                                        "than its max_concurrent_calls - 1: keep it below the pool's slots, so that "
                                        "one public link cannot take every agent; more → 503 with Retry-After (token "
                                        "holders are not counted)")
    webrtc_public_calls_per_client: int = Field(
        2, ge=1, le=10_000, description="anonymous browser calls one client (an IPv4 address or IPv6 /64) may have in "
                                        "progress on this gateway, all tenants together; more → 429 with Retry-After")
    webrtc_max_offer_candidates: int = Field(
        20, ge=1, le=64, description="UDP ICE candidates an offer may carry, all its sections together (a browser "
                                     "offers 2-12; TCP ones are left out, and three times this in all); more → 400. "
                                     "It also bounds the gateway's connectivity checks: a call's ICE agent keeps at "
                                     "most this many remote candidates, plus 4 learnt from the browser's own checks "
                                     "(peer-reflexive)")
    webrtc_ice_interfaces: list[str] = Field(
        [], description="where the gateway's ICE agent offers host candidates: interface names (eth0) or addresses "
                        "(10.0.0.5, 127.0.0.1); empty: every address but loopback")
    webrtc_ice_servers: list[IceServer] = Field(
        [], description="STUN/TURN servers for callers behind NAT (see docs/webrtc.md), used by the gateway and "
                        "handed to the browser page")
    webrtc_turn_secret: SecretStr | None = Field(
        None, description="a TURN server's shared secret (coturn use-auth-secret): TURN servers listed without a "
                          "username get short-lived credentials minted per page load and per call")
    webrtc_turn_credential_seconds: int = Field(
        3600, ge=60, le=86_400, description="how long a minted TURN credential is valid")
    webrtc_setup_timeout_seconds: float = Field(
        20.0, gt=0, le=300, description="from the offer to a primed agent and connected media; later, the call ends "
                                        "(setup_timeout)")
    webrtc_connect_timeout_seconds: float = Field(
        5.0, gt=0, le=120, description="from the answer to the browser's media connected (ICE, DTLS); later, the "
                                       "call ends (setup_timeout) and its slot is freed: an answered offer whose "
                                       "media never connects holds a slot this long at most")
    webrtc_media_timeout_seconds: float = Field(
        20.0, ge=1, le=3600, description="a connected browser call with no audio from the browser this long ends "
                                         "(media_timeout)")
    webrtc_jitter_buffer_packets: int = Field(
        2, ge=1, le=8, description="20 ms packets of the browser's audio held against network jitter before the "
                                   "oldest is decoded: each adds 20 ms before the agent hears the caller; fewer "
                                   "lose late packets on a jittery network")
    webrtc_outbound_cushion_packets: int = Field(
        1, ge=0, le=4, description="20 ms packets of agent audio kept against the worker's jitter (the browser has "
                                   "its own jitter buffer too)")
    sip_log_level: int = Field(1, ge=0, le=6, description="pjsua's own log level (stderr)")
    # SIP trunk digest authentication (gateway/sip/auth.py) and REGISTER (gateway/sip/registration.py).
    sip_auth_policy: Literal["allow_or_digest", "digest", "allow_and_digest"] = Field(
        "allow_or_digest",
        description="how a trunk's INVITE is admitted: allow_or_digest: a source in sip_allow as it is, any other "
                    "by digest (with no sip_auth_users: 403, as without digest); digest: every INVITE by digest, "
                    "whatever its source; allow_and_digest: a source in sip_allow, and by digest")
    sip_auth_realm: str = Field("personagate", min_length=1, max_length=128, pattern=r'^[^"\\\r\n]+$',
                                description="the digest realm offered in 401 challenges")
    sip_auth_users: dict[str, SecretStr] = Field(
        {}, description="trunk credentials, username → password (secrets: prefer sip_auth_users_file or the "
                        "environment)")
    sip_auth_users_file: Path | None = Field(
        None, description="a YAML file of trunk credentials (username: password), merged into sip_auth_users")
    sip_auth_algorithms: list[Literal["SHA-256", "MD5"]] = Field(
        ["SHA-256", "MD5"], min_length=1,
        description="digest algorithms offered, one WWW-Authenticate each, in this order (most preferred first)")
    sip_auth_nonce_seconds: float = Field(
        300.0, ge=5, le=3600, description="a challenge's nonce expires after this; a later retry gets 401 stale=true")
    sip_registrations: list[SipRegistration] = Field(
        [], description="REGISTER bindings kept at PBXs or carriers; their INVITEs are answered like any other")

    @field_validator("sip_allow")
    @classmethod
    def _sip_allow(cls, networks: list[str]) -> list[str]:
        for net in networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"sip_allow: {net!r} is not an address or CIDR network ({exc})") from None
        return networks

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _forwarded_allow_ips(cls, entries: list[str]) -> list[str]:
        """Each entry an address or a CIDR, written the way uvicorn matches it: uvicorn silently takes anything it
        cannot parse (``*``, ``10.0.0.1/8``, a host name) as a literal that no peer address ever equals, so a typo
        would quietly trust nobody, or with ``*`` everybody."""
        out: list[str] = []
        for entry in entries:
            text = entry.strip()
            try:
                if "/" in text:
                    out.append(str(ipaddress.ip_network(text, strict=False)))  # 10.0.0.1/8 -> 10.0.0.0/8
                else:
                    out.append(str(ipaddress.ip_address(text)))
            except ValueError:
                raise ValueError(f"forwarded_allow_ips: {entry!r} is not an IP address or CIDR network (to trust "
                                 "every peer, which lets any client pick its own address, list 0.0.0.0/0 and ::/0)"
                                 ) from None
        return out

    @field_validator("webrtc_ice_interfaces")
    @classmethod
    def _webrtc_ice_interfaces(cls, interfaces: list[str]) -> list[str]:
        if interfaces:
            from .webrtc.ice import check_interfaces

            check_interfaces(interfaces)
        return interfaces

    @field_validator("sip_public_address")
    @classmethod
    def _sip_public_address(cls, address: str | None) -> str | None:
        if address is None or address == "":
            return None
        if ":" in address:  # the SIP transport is UDP over IPv4: pjsua cannot start with an IPv6 public address
            raise ValueError(f"sip_public_address must be an IPv4 address or a host name (SIP runs over IPv4 here), "
                             f"got {address!r}")
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", address) or address == "0.0.0.0":
            raise ValueError(f"sip_public_address must be a host name or IP address others can reach, got {address!r}")
        return address

    @model_validator(mode="after")
    def _sip_rtp_ports(self) -> GatewaySettings:
        port, count = self.sip_rtp_port, self.sip_rtp_port_range
        if port % 2:
            raise ValueError(f"sip_rtp_port ({port}) must be even: RTP takes the even port of each pair, RTCP the odd")
        if count == 0:
            return self
        if port == 0:
            raise ValueError("sip_rtp_port_range needs sip_rtp_port, the first port of the range")
        if count < 4:
            raise ValueError(f"sip_rtp_port_range ({count}) must be at least 4 ports (pjsua cannot bound fewer)")
        if port + count - 1 > 65535:
            raise ValueError(f"sip_rtp_port_range: {port} + {count} ports go past 65535")
        if count // 2 < self.sip_max_calls:
            raise ValueError(f"sip_rtp_port_range ({count} ports from {port}) holds {count // 2} calls (RTP and RTCP "
                             f"each) but sip_max_calls is {self.sip_max_calls}: widen the range or lower "
                             "sip_max_calls")
        if self.rtp_port_share(0)[1] < 4:
            raise ValueError(f"sip_rtp_port_range ({count} ports) is shared by {self.sip_accounts} SIP accounts (the "
                             "trunks', the TLS trunks' when TLS is on, and each of sip_registrations): each needs at "
                             "least 4 ports")
        return self

    @property
    def sip_accounts(self) -> int:
        """pjsua accounts: the trunks' (UDP and TCP), each of ``sip_registrations``, and with TLS on the TLS trunks'
        (its own SRTP policy: ``gateway/sip/server.py``)."""
        return 1 + len(self.sip_registrations) + int(self.sip_tls_enabled)

    def rtp_port_share(self, account: int) -> tuple[int, int]:
        """The RTP ports of SIP account ``account`` (0: the trunks'; 1…: ``sip_registrations`` in order; then the TLS
        trunks'): its first port and how many, an even share of ``sip_rtp_port_range`` (the whole range with one
        account); (first, 0) without a bound."""
        if not self.sip_rtp_port_range:
            return self.sip_rtp_port, 0
        share = (self.sip_rtp_port_range // self.sip_accounts) & ~1
        return self.sip_rtp_port + account * share, share

    @field_validator("sip_tls_cert_file", "sip_tls_key_file", "sip_tls_ca_file")
    @classmethod
    def _sip_tls_file(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is None or str(path) == "":
            return None
        from personagate_common.tls import check_readable

        return check_readable(info.field_name or "", path)

    @model_validator(mode="after")
    def _sip_tls(self) -> GatewaySettings:
        from personagate_common.tls import check_ca_file, check_key_pair

        cert, key = self.sip_tls_cert_file, self.sip_tls_key_file
        if (cert is None) != (key is None):
            given, missing = ("sip_tls_cert_file", "sip_tls_key_file") if key is None else \
                ("sip_tls_key_file", "sip_tls_cert_file")
            raise ValueError(f"{given} is set but {missing} is not: SIP over TLS needs both")
        if cert is not None and key is not None:
            check_key_pair(cert, key)
            if self.sip_tls_port and self.sip_tls_port == self.sip_port:
                raise ValueError(f"sip_tls_port ({self.sip_tls_port}) is sip_port: SIP over TCP listens there")
        elif self.sip_tls_ca_file is not None or self.sip_tls_require_client_cert:
            setting = "sip_tls_ca_file" if self.sip_tls_ca_file is not None else "sip_tls_require_client_cert"
            raise ValueError(f"{setting} is set but SIP over TLS is off: set sip_tls_cert_file and sip_tls_key_file")
        if self.sip_tls_ca_file is not None:
            check_ca_file(self.sip_tls_ca_file)
        elif self.sip_tls_require_client_cert:
            raise ValueError("sip_tls_require_client_cert needs sip_tls_ca_file: the CAs client certificates must "
                             "chain to")
        if self.sip_srtp == "mandatory" and cert is None and not self.sip_srtp_insecure_signalling:
            raise ValueError("sip_srtp is mandatory but SIP over TLS is off and sip_srtp_insecure_signalling is false: "
                             "no call could carry its SRTP keys, so every call would be refused; set "
                             "sip_tls_cert_file and sip_tls_key_file, or allow sip_srtp_insecure_signalling")
        return self

    @property
    def sip_tls_enabled(self) -> bool:
        return self.sip_tls_cert_file is not None and self.sip_tls_key_file is not None

    @model_validator(mode="after")
    def _session_timer(self) -> GatewaySettings:
        if self.sip_session_expires_seconds < self.sip_min_se_seconds:
            raise ValueError(f"sip_session_expires_seconds ({self.sip_session_expires_seconds}) is below "
                             f"sip_min_se_seconds ({self.sip_min_se_seconds})")
        return self

    @model_validator(mode="after")
    def _sip_auth(self) -> GatewaySettings:
        if self.sip_auth_users_file is not None:
            self.sip_auth_users = _read_credentials(self.sip_auth_users_file) | self.sip_auth_users
        for username in self.sip_auth_users:
            if not username or len(username) > 128 or any(c in username for c in '"\\\r\n'):
                raise ValueError(f"sip_auth_users: {username[:40]!r} is not a usable digest username")
        if self.sip_auth_policy != "allow_or_digest" and not self.sip_auth_users:
            raise ValueError(f"sip_auth_policy {self.sip_auth_policy} needs trunk credentials (sip_auth_users or "
                             "sip_auth_users_file): without them no INVITE could be admitted")
        if len(set(self.sip_auth_algorithms)) != len(self.sip_auth_algorithms):
            raise ValueError("sip_auth_algorithms: an algorithm is listed twice")
        names = [r.name for r in self.sip_registrations]
        if len(set(names)) != len(names):
            raise ValueError("sip_registrations: the same user is registered twice at one registrar")
        return self

    @field_validator("workers")
    @classmethod
    def _workers(cls, urls: list[str]) -> list[str]:
        out: list[str] = []
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ValueError(f"a worker is its HTTP base URL, e.g. http://127.0.0.1:8765; got {url!r}")
            url = url.rstrip("/")
            if url in out:
                raise ValueError(f"worker {url!r} is listed twice")
            out.append(url)
        return out

    @field_validator("worker_secret", "worker_secret_file", "worker_tls_ca_file", "http_tls_cert_file",
                     "http_tls_key_file", "admin_host", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _plane(self) -> GatewaySettings:
        if self.worker_secret is not None and self.worker_secret_file is not None:
            raise ValueError("worker_secret and worker_secret_file are both set: the gateway sends one secret")
        if self.worker_secret is not None:
            self._worker_secret = check_secret("worker_secret", self.worker_secret.get_secret_value())
        elif self.worker_secret_file is not None:
            self._worker_secret = read_secrets("worker_secret_file", self.worker_secret_file)[0]
        if self.worker_tls_ca_file is not None:
            check_ca_file("worker_tls_ca_file", self.worker_tls_ca_file)
        check_server_tls("http_tls_cert_file", self.http_tls_cert_file, "http_tls_key_file", self.http_tls_key_file)
        if self.admin_host is not None and self.admin_port is None:
            raise ValueError("admin_host is set but admin_port is not: the admin API's own listener needs a port")
        if self.admin_port is not None and self.admin_port != 0 and self.admin_port == self.http_port \
                and (self.admin_host or self.host) == self.host:
            raise ValueError(f"admin_port ({self.admin_port}) is http_port: give the admin API a port of its own, "
                             "or leave admin_port unset to serve it on http_port")
        return self

    def worker_auth(self) -> WorkerAuth:
        """What this gateway sends to workers and checks them with (``personagate_common/plane.py``)."""
        from personagate_common.plane import WorkerAuth

        return WorkerAuth(secret=self._worker_secret, ca_file=self.worker_tls_ca_file)

    @property
    def http_tls_enabled(self) -> bool:
        return self.http_tls_cert_file is not None and self.http_tls_key_file is not None


def _read_credentials(path: Path) -> dict[str, SecretStr]:
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        line, column, message = describe(exc)
        raise ValueError(f"sip_auth_users_file {path}:{line}:{column}: {message}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"sip_auth_users_file {path}: cannot read it ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str | int) for k, v in data.items()):
        raise ValueError(f"sip_auth_users_file {path}: expected a mapping of username: password")
    return {k: SecretStr(str(v)) for k, v in data.items()}


def load_gateway_settings(config_file: Path | None = None, **overrides: Any) -> GatewaySettings:
    """Settings from ``config_file`` < environment < ``overrides``; SettingsError lists every problem."""
    return load_settings(GatewaySettings, "gateway", config_file, **overrides)
