"""The pjsua thread: the one thread that owns pjsua2's ``Endpoint`` and every Call and Account object.

pjsua2 is a client library wrapped for Python with SWIG; it is safe from Python only when one thread drives
it: ``uaConfig.threadCnt = 0`` (no pjsua worker threads) and ``mainThreadOnly = True``
(callbacks from pjlib's other threads are posted to ours), and this thread runs ``libHandleEvents(10)`` in a
loop. Everything else reaches pjsua through ``UserAgent.submit(fn)`` / ``UserAgent.post(fn)``: a thread-safe
queue of callables run between two ``libHandleEvents`` calls. Objects made here (calls, media ports) are
dropped here too, so their C++ destructors never run on another thread (garbage collection on an
unregistered thread asserts in pjlib: pjproject #2416, #3856, #4353).

The conference bridge runs on the null sound device's clock thread (no sound card on a server): media
ports' frame callbacks run there, holding the GIL, so they only copy bytes (``media.py``). Those ports are
never destroyed while that clock runs (``FramePorts``), and no final answer is given inside ``onIncomingCall``
(``Leg.refuse``): docs/sip.md, "Object lifetimes".
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pjsua2 as pj

from ..call.line import CLOCK_RATE, PTIME_MS

log = logging.getLogger(__name__)

T = TypeVar("T")

# Offered in this order; every other codec the build has is disabled (telephone-event is always offered).
CODECS = ("PCMU/8000/1", "PCMA/8000/1", "G722/16000/1")


class FrameSink:
    """What a ``FramePort`` hands its frames to (``media.MediaBuffers``): called on the bridge's clock thread."""

    def frame_received(self, frame: pj.MediaFrame) -> None: ...

    def frame_requested(self, frame: pj.MediaFrame) -> None: ...


class AgentSink:
    """The Python side of an ``AgentPort`` (``media.PortMedia``): given its port on the pjsua thread, and its
    events (``pj.AGENT_PORT_*`` bits) on the event loop."""

    def attach(self, port: pj.AgentPort) -> None: ...

    def detach(self) -> None: ...

    def on_events(self, events: int) -> None: ...


class FramePort(pj.AudioMediaPort):
    """A tap on the conference bridge (16 kHz mono s16le, 20 ms) whose frames go to ``sink``, or nowhere while it
    has none; its callbacks are Python, on the clock thread (a human's leg, the ``call`` command). Agent calls use
    ``pj.AgentPort``, whose frames never leave C++ on that thread (deploy/pjsua2/ext/agent_port.hpp)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.sink: FrameSink | None = None
        fmt = pj.MediaFormatAudio()
        fmt.type = pj.PJMEDIA_TYPE_AUDIO
        fmt.clockRate = CLOCK_RATE
        fmt.channelCount = 1
        fmt.bitsPerSample = 16
        fmt.frameTimeUsec = PTIME_MS * 1000
        self.createPort(name, fmt)

    def onFrameReceived(self, frame: pj.MediaFrame) -> None:
        sink = self.sink  # read once: the pjsua thread may take it away meanwhile
        if sink is not None:
            sink.frame_received(frame)

    def onFrameRequested(self, frame: pj.MediaFrame) -> None:
        sink = self.sink
        if sink is not None:
            sink.frame_requested(frame)


BridgePort = FramePort | pj.AgentPort


class FramePorts:
    """Media ports lent to calls and given back, never destroyed while the bridge's clock runs.

    pjsua2 calls a ``FramePort``'s Python object from the clock thread. A port destroyed while the bridge still
    runs it (when its call ends, or by the garbage collector on whatever thread) is called half-destroyed: its
    attributes gone (``AttributeError``), then freed memory (SIGSEGV), as calls hung up within 50 ms of the answer
    showed. So a call's port is lent from here and given back when the call ends: disconnected, its sink removed
    at once (no frame reaches the call after that), and lent again only after ``QUARANTINE_SECONDS``, by which
    time the bridge has applied the disconnection (pjmedia applies connection changes on its next tick). Ports are
    destroyed in ``close``, once the clock has stopped. ``AgentPort``s are kept the same way: one is made and
    destroyed on the pjsua thread only, and reset before it is lent again. (pjsua thread only, but for
    ``dispatch``.)"""

    QUARANTINE_SECONDS = 0.1  # five bridge ticks

    def __init__(self) -> None:
        self._idle: dict[type, deque[tuple[float, BridgePort]]] = {FramePort: deque(), pj.AgentPort: deque()}
        self._made = 0
        self.lent = 0
        self.agents: dict[int, AgentSink] = {}  # AgentPort id → the sink it is lent to (read by ``dispatch``)

    def take(self, sink: FrameSink | AgentSink) -> BridgePort:
        kind = pj.AgentPort if isinstance(sink, AgentSink) else FramePort
        idle = self._idle[kind]
        port: BridgePort
        if idle and time.monotonic() - idle[0][0] >= self.QUARANTINE_SECONDS:
            port = idle.popleft()[1]
        else:
            self._made += 1
            if kind is FramePort:
                port = FramePort(f"port{self._made}")
            else:
                port = pj.AgentPort()
                port.create(f"agent{self._made}")
        if isinstance(port, FramePort):
            port.sink = sink  # type: ignore[assignment]
        else:
            assert isinstance(sink, AgentSink)
            self.agents[port.getId()] = sink
            sink.attach(port)
        self.lent += 1
        return port

    def give_back(self, port: BridgePort, connected: list[pj.AudioMedia]) -> None:
        """``port`` disconnected from each of ``connected`` (both ways) and idle from now on."""
        if isinstance(port, FramePort):
            port.sink = None
        else:
            sink = self.agents.pop(port.getId(), None)
            if sink is not None:
                sink.detach()
        for media in connected:
            with contextlib.suppress(pj.Error):
                port.stopTransmit(media)
            with contextlib.suppress(pj.Error):
                media.stopTransmit(port)
        if isinstance(port, pj.AgentPort):
            port.reset()
        self.lent -= 1
        self._idle[type(port)].append((time.monotonic(), port))

    @property
    def made(self) -> int:
        return self._made

    def dispatch(self) -> None:
        """(The event loop, when ``pj.agentPortEventFd()`` is readable) hand each agent port's events to its sink."""
        agents = self.agents
        for code in pj.agentPortEvents():
            sink = agents.get(code >> 3)
            if sink is not None:
                sink.on_events(code & 7)

    def close(self) -> None:
        """Destroy every idle port: only once the bridge's clock has stopped."""
        for idle in self._idle.values():
            idle.clear()
        self.agents.clear()


@dataclass(frozen=True)
class TlsTransport:
    """SIP over TLS: the gateway's listener with its certificate (``sip_tls_*``), or a caller's transport (no
    certificate of its own)."""

    port: int = 5061  # 0: any free port
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""  # the CAs that certificates verified here must chain to
    verify_client: bool = False  # a client certificate that does not chain to ca_file ends its connection
    require_client_cert: bool = False  # mutual TLS: no client certificate, no connection
    verify_server: bool = False  # a caller: the server's certificate must chain to ca_file (and name its host)
    min_version: str = "1.2"  # "1.2" or "1.3"


@dataclass(frozen=True)
class UaConfig:
    host: str = "127.0.0.1"
    port: int = 5060  # 0: any free port (the caller)
    max_calls: int = 256
    user_agent: str = "personagate"
    log_level: int = 1  # pjsua's own log (0-6) on stderr
    codecs: tuple[str, ...] = CODECS  # offered (and accepted) in this order; the caller narrows it (--codec)
    public_address: str | None = None  # the address in Via/Contact instead of the bound one (NAT 1:1, a node's IP)
    max_message_bytes: int = 16_384  # a larger SIP request is answered 513 by the guard (sip_max_message_bytes)
    tls: TlsTransport | None = None  # SIP over TLS as well as UDP and TCP


class UserAgent:
    """A pjsua2 Endpoint on its own thread. ``start()`` returns once the transports listen: UDP and TCP on one port,
    and TLS on its own with ``config.tls``."""

    def __init__(self, config: UaConfig, *, make_account: Callable[[UserAgent], pj.Account] | None = None) -> None:
        self.config = config
        self._make_account = make_account
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._started = concurrent.futures.Future[int]()
        self.ep: pj.Endpoint | None = None
        self.account: pj.Account | None = None
        self.bound_port = 0
        self.tls_port = 0  # the TLS transport's port, once started with config.tls
        self.transports: dict[str, int] = {}  # "udp", "tcp", "tls" → pjsua's transport id
        self._keep: dict[object, object] = {}  # pjsua objects kept alive until dropped on this thread
        self.ports = FramePorts()

    # ------------------------------------------------------------------ any thread

    def start(self, timeout: float = 10.0) -> int:
        """Start the thread and the endpoint; returns the SIP port it listens on."""
        self._thread = threading.Thread(target=self._run, name="pjsua", daemon=True)
        self._thread.start()
        self.bound_port = self._started.result(timeout)
        return self.bound_port

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` on the pjsua thread; its result (or exception) in the future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                future.set_exception(exc)

        self._commands.put(run)
        return future

    def post(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the pjsua thread; failures are logged."""

        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("pjsua command failed")

        self._commands.put(run)

    def stop(self, timeout: float = 10.0) -> None:
        """Hang up every call, destroy the endpoint, end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # ------------------------------------------------------------------ the pjsua thread

    def keep(self, key: object, obj: object) -> None:
        self._keep[key] = obj

    def kept(self, key: object) -> object | None:
        return self._keep.get(key)

    def drop(self, key: object) -> None:
        """Forget a kept object; its destructor runs now, on this thread."""
        self._keep.pop(key, None)

    def _run(self) -> None:
        try:
            port = self._create()
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._started.set_exception(exc)
            self._destroy()
            return
        self._started.set_result(port)
        try:
            while not self._stop.is_set():
                self._run_commands()
                self.ep.libHandleEvents(10)
        finally:
            self._shutdown()

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _create(self) -> int:
        cfg = self.config
        ep = self.ep = pj.Endpoint()
        with _stdout_to_stderr():  # pjlib greets on stdout before any log setting applies
            ep.libCreate()
        ep_cfg = pj.EpConfig()
        ep_cfg.uaConfig.threadCnt = 0
        ep_cfg.uaConfig.mainThreadOnly = True
        # PJSUA_MAX_CALLS is a compile-time cap and maxCalls is silently clamped to it (pjproject #4488): 512 in
        # deploy/pjsua2's build (config_site.h), which sip_max_calls cannot exceed.
        ep_cfg.uaConfig.maxCalls = cfg.max_calls
        ep_cfg.uaConfig.userAgent = cfg.user_agent
        ep_cfg.logConfig.level = cfg.log_level
        ep_cfg.logConfig.consoleLevel = cfg.log_level
        med = ep_cfg.medConfig
        med.clockRate = CLOCK_RATE
        med.sndClockRate = CLOCK_RATE
        med.audioFramePtime = PTIME_MS
        med.ptime = PTIME_MS
        med.channelCount = 1
        med.noVad = True  # continuous RTP: no silence suppression, the model hears every frame
        med.ecTailLen = 0  # no echo canceller on a server
        med.quality = 10  # the bridge's resampler (8 kHz codecs <-> the 16 kHz bridge): the large filter
        med.maxMediaPorts = max(254, 2 * cfg.max_calls + 16)
        ep.libInit(ep_cfg)
        tcfg = pj.TransportConfig()
        tcfg.port = cfg.port
        tcfg.boundAddress = cfg.host
        if cfg.public_address:
            tcfg.publicAddress = cfg.public_address
        transport = self.transports["udp"] = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
        bound = ep.transportGetInfo(transport).localName  # "host:port"
        # SIP over TCP on the same port (RFC 3261 requires both): large requests and trunks that insist on TCP. With
        # port 0 (a caller) any free TCP port will do.
        self.transports["tcp"] = ep.transportCreate(pj.PJSIP_TRANSPORT_TCP, tcfg)
        if cfg.tls is not None:
            self.transports["tls"] = self._create_tls(ep, cfg.tls)
            self.tls_port = int(ep.transportGetInfo(self.transports["tls"]).localName.rsplit(":", 1)[1])
        ep.libStart()
        # The SIP guard (deploy/pjsua2/ext/sip_guard.hpp, built into this pjsua2): malformed and unsupported requests
        # answered as RFC 3261 wants before pjsua sees them, and every final response counted. Started before this
        # thread first handles events, so no request arrives unguarded.
        guard = pj.SipGuardConfig()
        guard.maxMessageBytes = cfg.max_message_bytes
        failed = pj.sipGuardStart(guard)
        if failed:
            raise RuntimeError(f"the SIP guard did not start: {failed}")
        ep.audDevManager().setNullDev()  # no sound card: the null device only clocks the bridge
        for codec in ep.codecEnum2():
            ep.codecSetPriority(codec.codecId, 0)
        for rank, name in enumerate(cfg.codecs):
            with contextlib.suppress(pj.Error):
                ep.codecSetPriority(name, 250 - rank)
        if self._make_account is not None:
            self.account = self._make_account(self)
        return int(bound.rsplit(":", 1)[1])

    def _create_tls(self, ep: pj.Endpoint, tls: TlsTransport) -> int:
        """The TLS transport; its files were checked with the settings (``tls.py``), so a failure here is rare and
        is raised naming the port and pjsua's reason."""
        cfg = self.config
        tcfg = pj.TransportConfig()
        tcfg.port = tls.port
        tcfg.boundAddress = cfg.host
        if cfg.public_address:
            tcfg.publicAddress = cfg.public_address
        t = tcfg.tlsConfig
        t.certFile, t.privKeyFile, t.CaListFile = tls.cert_file, tls.key_file, tls.ca_file
        t.proto = pj.PJ_SSL_SOCK_PROTO_TLS1_3 if tls.min_version == "1.3" else \
            pj.PJ_SSL_SOCK_PROTO_TLS1_2 | pj.PJ_SSL_SOCK_PROTO_TLS1_3
        # pjsip's server asks every client for a certificate: verifyClient ends a connection whose certificate does
        # not chain to the CA file, requireClientCert one without any.
        t.verifyClient = tls.verify_client
        t.requireClientCert = tls.require_client_cert
        t.verifyServer = tls.verify_server
        t.msecTimeout = 10_000  # a handshake that stalls longer is dropped
        try:
            return ep.transportCreate(pj.PJSIP_TRANSPORT_TLS, tcfg)
        except pj.Error as exc:
            raise RuntimeError(f"SIP over TLS did not start on {cfg.host}:{tls.port}: {exc.reason}") from None

    def _shutdown(self) -> None:
        ep = self.ep
        if ep is None:
            return
        with contextlib.suppress(Exception):
            self._run_commands()
        with contextlib.suppress(Exception):
            ep.hangupAllCalls()
            for _ in range(30):  # let the BYEs out and the calls disconnect
                ep.libHandleEvents(10)
                self._run_commands()
        self._destroy()

    def _destroy(self) -> None:
        if self.ep is not None:
            with contextlib.suppress(Exception):
                self.ep.audDevManager().setNoDev()  # the bridge's clock stops: no frame callback from here on
        self._keep.clear()
        self.ports.close()
        account, self.account = self.account, None
        if account is not None:
            with contextlib.suppress(Exception):
                account.shutdown()
        del account
        gc.collect()  # the calls' and ports' destructors before libDestroy (pjproject #4353), on this thread
        ep, self.ep = self.ep, None
        if ep is not None:
            pj.sipGuardStop()
            with contextlib.suppress(Exception):
                ep.libDestroy()
        del ep
        gc.collect()


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def header(name: str, value: str) -> Any:
    h = pj.SipHeader()
    h.hName = name
    h.hValue = value
    return h


def call_op(status: int = 0, reason: str = "", headers: dict[str, str] | None = None) -> pj.CallOpParam:
    prm = pj.CallOpParam(True)
    if status:
        prm.statusCode = status
    if reason:
        prm.reason = reason
    for name, value in (headers or {}).items():
        prm.txOption.headers.append(header(name, value))
    return prm
