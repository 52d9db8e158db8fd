"""The ``personagate`` command.

    personagate up [--model tiny|personaplex|echo] [--weights DIR] [--tenants DIR]   (the main job)
    personagate worker [--model tiny|personaplex|echo] [--weights DIR] [--slots N] [--port 8765]
    personagate bench worker [--json] [--batch-sizes 1,4,16,32] [--model personaplex --random-weights]
    personagate session ws://127.0.0.1:8765/v1/sessions [--play in.wav] [--record out.wav] [--seconds 5]
    personagate tenants validate [DIR]
    personagate tenants token TENANT | --operator
    personagate gateway [--config gateway.yaml] [--tenants DIR] [--admin-tokens FILE] [--host H] [--port 8080]
                        [--redis-url URL | --worker http://127.0.0.1:8765 ...]
    personagate call sip:NUMBER@HOST:PORT [--play in.wav] [--record out.wav] [--seconds N] [--dtmf 0@2.0]
                     [--user U --password P]
    personagate bench routing [--redis-url URL] [--workers 4 --slots 32 --claims 20000 --concurrency 64]
    personagate bench sip [--calls 1,2,4] [--seconds 20] [--json]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="personagate", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run a GPU worker: batched duplex sessions over WebSocket")
    _worker_options(worker)
    worker.add_argument("--host", help="listen address (default 127.0.0.1)")
    worker.add_argument("--port", type=int, help="listen port (default 8765)")
    worker.add_argument("--session-secret-file", type=Path,
                        help="accepted shared secrets, one per line: gateways send one (default: none, and the worker "
                             "refuses to start without one unless --insecure-open-sessions)")
    worker.add_argument("--insecure-open-sessions", action="store_const", const=True,
                        help="serve sessions and /v1/info with no secret (only for a worker nothing else can reach)")
    worker.add_argument("--log-level", default="info")

    bench = commands.add_parser("bench", help="benchmarks")
    bench_targets = bench.add_subparsers(dest="target", required=True)
    bench_worker = bench_targets.add_parser("worker", help="tick time, real-time capacity, session start")
    _worker_options(bench_worker)
    bench_worker.add_argument("--json", action="store_true", help="print one JSON document")
    bench_worker.add_argument("--batch-sizes", default="1,4,16,32", help="comma-separated slot counts")
    bench_worker.add_argument("--ticks", type=int, default=100, help="measured ticks per batch size")
    bench_worker.add_argument("--max-slots", type=int, default=128, help="largest batch the capacity search tries")
    bench_worker.add_argument("--warmup", type=int, default=5, help="unmeasured ticks per batch size")
    bench_worker.add_argument("--random-weights", action="store_true",
                              help="with --model personaplex and no --weights: PersonaPlex-7B's architecture with "
                                   "seeded random weights, for speed figures only (benchmarks only, never served)")

    bench_routing = bench_targets.add_parser(
        "routing", help="slot claims per second and claim latency: Redis (with --redis-url) and the embedded store")
    bench_routing.add_argument("--redis-url", help="a Redis to measure (its keys go under a private prefix and are "
                                                   "deleted afterwards); omit: the embedded store only")
    bench_routing.add_argument("--workers", type=int, default=4, help="workers registered (default 4)")
    bench_routing.add_argument("--slots", type=int, default=32, help="slots per worker (default 32)")
    bench_routing.add_argument("--claims", type=int, default=20000, help="claim + release cycles per store")
    bench_routing.add_argument("--concurrency", type=int, default=64, help="cycles in flight at once (default 64)")

    bench_sip = bench_targets.add_parser(
        "sip", help="concurrent calls through one gateway and an echo worker: packet interval, loss, latency")
    bench_sip.add_argument("--calls", default="1,2,4", help="comma-separated counts of concurrent calls")
    bench_sip.add_argument("--seconds", type=float, default=20.0, help="length of each round's calls (default 20)")
    bench_sip.add_argument("--gateway-cpu", type=int, help="run the gateway on this CPU alone (the worker and the "
                                                           "measuring caller on the others): what one core carries")
    bench_sip.add_argument("--json", action="store_true", help="print one JSON document")

    session = commands.add_parser("session", help="talk to a worker: play a wav, record the agent, print JSON")
    session.add_argument("url", nargs="?", default="ws://127.0.0.1:8765/v1/sessions")
    session.add_argument("--prompt", default="You are a friendly agent at a call center. Greet the caller.")
    session.add_argument("--voice", default=None, help="voice preset (default: the worker's first)")
    session.add_argument("--persona", metavar="TENANT/PERSONA",
                         help="talk to a tenant's persona as calls get it (prompt, prepared voice clip, sampling) "
                              "instead of --prompt/--voice")
    session.add_argument("--tenants", type=Path, default=Path("tenants"), help="tenants folder for --persona")
    session.add_argument("--play", type=Path, help="caller audio: a wav/flac file (default: silence)")
    session.add_argument("--record", type=Path, help="write the agent's audio to this wav file")
    session.add_argument("--seconds", type=float, help="how long to talk (default: the --play file, or 5 s)")
    session.add_argument("--secret-file", type=Path,
                         help="the worker's shared secret (first line); default: $PERSONAGATE_GATEWAY_WORKER_SECRET_FILE"
                              " or $PERSONAGATE_GATEWAY_WORKER_SECRET as the gateway reads them, else the one "
                              "'personagate up' keeps in .personagate/worker-secret")
    session.add_argument("--ca-file", type=Path, help="for a wss:// worker: the CA certificates (PEM) its certificate "
                                                      "must chain to (default: the system's)")

    tenants = commands.add_parser("tenants", help="tenant personas")
    tenant_actions = tenants.add_subparsers(dest="action", required=True)
    validate = tenant_actions.add_parser(
        "validate", help="check a tenants folder: every problem as file:line:column: field: message; exit 1 if any")
    validate.add_argument("folder", nargs="?", type=Path, default=Path("tenants"))
    token = tenant_actions.add_parser(
        "token", help="make an admin API token: print it once, and the hash line for the admin tokens file")
    token.add_argument("tenant", nargs="?", help="the tenant the token reaches")
    token.add_argument("--operator", action="store_true", help="a token that reaches every tenant")

    gateway = commands.add_parser("gateway", help="run the gateway: tenant admin API (HTTP), live tenant config")
    gateway.add_argument("--config", type=Path, help="YAML settings file (environment and flags override it)")
    gateway.add_argument("--tenants", type=Path, help="the tenants folder (default: tenants)")
    gateway.add_argument("--admin-tokens", type=Path, help="admin API tokens file (default: none, API disabled)")
    gateway.add_argument("--host", help="listen address (default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="HTTP port (default 8080)")
    gateway.add_argument("--admin-port", type=int, help="serve the admin API on this port of its own, not on --port "
                                                        "(default: on --port)")
    gateway.add_argument("--redis-url", help="the routing Redis shared with the workers (default: none, the "
                                             "embedded store, which polls --worker)")
    gateway.add_argument("--worker", action="append", metavar="URL",
                         help="without --redis-url: a worker's HTTP base URL; repeat for several "
                              "(default http://127.0.0.1:8765)")
    gateway.add_argument("--sip", action="store_const", const=True, help="answer SIP calls (UDP, TCP; default off)")
    gateway.add_argument("--sip-host", help="SIP/RTP listen address (default 127.0.0.1)")
    gateway.add_argument("--sip-port", type=int, help="SIP port, UDP and TCP (default 5060); implies --sip")
    gateway.add_argument("--log-level", default="info")

    call = commands.add_parser(
        "call", help="place a SIP call (pjsua2): play a wav, record what comes back, print timings as JSON")
    call.add_argument("uri", help="sip:NUMBER@HOST:PORT, e.g. sip:+14155550186@127.0.0.1:5060")
    call.add_argument("--play", type=Path, help="caller audio once answered: a wav/flac file (default: silence)")
    call.add_argument("--record", type=Path, help="write what comes back after 200 OK to this wav file (16 kHz)")
    call.add_argument("--seconds", type=float, help="how long to stay on the call once answered "
                                                    "(default: the --play file, or 5 s)")
    call.add_argument("--timeout", type=float, default=30.0, help="give up if not answered in this many seconds")
    call.add_argument("--host", default="127.0.0.1", help="the caller's own SIP/RTP address (default 127.0.0.1)")
    call.add_argument("--dtmf", action="append", default=[], metavar="DIGITS@SECONDS",
                      help="send DIGITS (RFC 4733) this many seconds after the answer, e.g. 0@2.0; repeatable")
    call.add_argument("--user", help="digest username, for a gateway or trunk that challenges (401/407)")
    call.add_argument("--password", help="digest password (default: $PERSONAGATE_CALL_PASSWORD; a flag shows in ps)")
    call.add_argument("--accept-refer", action="store_true",
                      help="answer a REFER 202 and call its target (default: refuse it, 603)")
    call.add_argument("--codec", action="append", default=[], choices=("PCMU", "PCMA", "G722"),
                      help="offer only this codec; repeat to offer several, in order (default: PCMU PCMA G722)")
    call.add_argument("--transport", choices=("udp", "tcp", "tls"), default="udp",
                      help="SIP over UDP (default), TCP or TLS (the gateway's sip_tls_port, 5061 by default)")
    call.add_argument("--ca-file", help="with --transport tls: check the gateway's certificate against these CAs "
                                        "(PEM); without it the certificate is not checked")
    call.add_argument("--srtp", choices=("off", "optional", "mandatory"), default="off",
                      help="offer SRTP (SDES keys): optional (RTP/AVP with keys) or mandatory (RTP/SAVP); "
                           "the report's srtp says whether the call got it (default: off)")

    up = commands.add_parser("up", help="the whole stack on one machine: a worker and the gateway, supervised")
    _worker_options(up)
    up.add_argument("--tenants", type=Path, default=Path("tenants"), help="the tenants folder (default: tenants)")
    up.add_argument("--host", default="127.0.0.1", help="listen address of both (default 127.0.0.1)")
    up.add_argument("--worker-port", type=int, default=8765)
    up.add_argument("--http-port", type=int, default=8080, help="the gateway's HTTP port (admin API)")
    up.add_argument("--sip-port", type=int, default=5060, help="the gateway's SIP UDP port (default 5060)")
    up.add_argument("--state-dir", type=Path, default=Path(".personagate"),
                    help="where the local operator token and the workers' shared secret are kept "
                         "(default: .personagate)")
    up.add_argument("--redis-url", help="route through this Redis (worker heartbeats, gateway claims) instead of "
                                        "the embedded store")

    args = parser.parse_args(argv)
    if args.command == "up":
        return _run_up(args)
    if args.command == "tenants":
        return _run_token(args, parser) if args.action == "token" else _run_tenants(args)
    if args.command == "gateway":
        return _run_gateway(args)
    if args.command == "worker":
        return _run_worker(args)
    if args.command == "session":
        return _run_session(args)
    if args.command == "call":
        return _run_call(args)
    if args.target == "routing":
        return _run_bench_routing(args)
    if args.target == "sip":
        return _run_bench_sip(args)
    return _run_bench(args)


def _worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML settings file (environment and flags override it)")
    parser.add_argument("--model", choices=["tiny", "personaplex", "echo"],
                        help="tiny (default), personaplex, or echo (no model: the caller's audio one frame later)")
    parser.add_argument("--weights", type=Path, help="PersonaPlex checkpoint folder (nvidia/personaplex-7b-v1)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when present)")
    parser.add_argument("--slots", type=int, help="sessions per worker (default: 32 on a GPU, 8 tiny-model ones on a CPU)")
    parser.add_argument("--greedy", action="store_const", const=True, help="greedy decoding (deterministic)")


def _settings(args: argparse.Namespace):
    from agent_runtime.config import SettingsError, load_worker_settings

    overrides = {
        "model": args.model,
        "weights": args.weights,
        "device": args.device,
        "slots": args.slots,
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "session_secret_file": getattr(args, "session_secret_file", None),
        "insecure_open_sessions": getattr(args, "insecure_open_sessions", None),
    }
    if args.greedy:
        overrides["sampling"] = {"greedy": True}
    try:
        settings = load_worker_settings(args.config, **overrides)
    except SettingsError as exc:
        print(f"personagate: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    # moshi decides at import time whether to wrap its kernels in torch.compile, which then costs tens
    # of seconds on the first step of every new shape; the GPU path relies on CUDA graphs instead.
    if "NO_TORCH_COMPILE" not in os.environ:
        os.environ["NO_TORCH_COMPILE"] = "1"
    return settings


def _run_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    problem = settings.open_plane_problem()
    if problem is not None:
        print(f"personagate: {problem}", file=sys.stderr)
        return 2
    from agent_runtime.drain import serve
    from personagate_common import logs

    logs.configure(args.log_level)
    ws, http = ("wss", "https") if settings.tls_enabled else ("ws", "http")
    access = f"{len(settings.accepted_secrets)} shared secret(s)" if settings.accepted_secrets else \
        "OPEN to anyone who can connect (insecure_open_sessions)"
    print(
        f"personagate worker: model {settings.model}, sessions on {ws}://{settings.host}:{settings.port}/v1/sessions"
        f" ({access}; ready when {http}://{settings.host}:{settings.port}/readyz says so; SIGTERM drains, "
        "Ctrl-C stops)",
        file=sys.stderr,
    )
    return serve(settings)


def _run_session(args: argparse.Namespace) -> int:
    import asyncio
    import json
    from urllib.parse import urlsplit

    import httpx
    import numpy as np
    import soundfile

    from gateway.worker_client import WorkerRefused, persona_message, talk

    auth = _session_auth(args)
    if auth is None:
        return 2
    if args.persona is not None:
        persona = _tenant_persona(args.persona, args.tenants)
        if persona is None:
            return 2
    else:
        voice = args.voice
        if voice is None:
            parts = urlsplit(args.url)
            scheme = "https" if parts.scheme == "wss" else "http"
            try:
                voices = httpx.get(f"{scheme}://{parts.netloc}/v1/info", timeout=5, headers=auth.headers(),
                                   verify=auth.ssl_context()).json().get("voices") or []
            except (httpx.HTTPError, ValueError) as exc:
                print(f"personagate: cannot reach the worker at {parts.netloc}: {exc}", file=sys.stderr)
                return 1
            voice = voices[0] if voices else None
        persona = persona_message(args.prompt, voice=voice)
    caller = np.zeros(0, dtype=np.float32)
    if args.play is not None:
        caller = _read_mono(args.play, 24_000)
        if caller is None:
            return 2
    seconds = args.seconds or (len(caller) / 24_000 if len(caller) else 5.0)
    try:
        report, agent = asyncio.run(talk(args.url, persona, caller_audio=caller, seconds=seconds, auth=auth))
    except WorkerRefused as exc:
        print(f"personagate: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"personagate: cannot reach the worker at {args.url}: {exc}", file=sys.stderr)
        return 1
    if args.record is not None:
        soundfile.write(args.record, agent, 24_000)
    print(json.dumps(report, indent=2))
    return 0


def _session_auth(args: argparse.Namespace):
    """``personagate session``'s credential: --secret-file, else the gateway's environment, else ``up``'s local
    secret when there is one; None after saying why it cannot be read."""
    from gateway.up import DEFAULT_STATE_DIR, WORKER_SECRET_FILE
    from personagate_common.plane import WorkerAuth, check_secret, read_secrets

    try:
        if args.secret_file is not None:
            secret: str | None = read_secrets("--secret-file", args.secret_file)[0]
        elif path := os.environ.get("PERSONAGATE_GATEWAY_WORKER_SECRET_FILE"):
            secret = read_secrets("PERSONAGATE_GATEWAY_WORKER_SECRET_FILE", Path(path))[0]
        elif value := os.environ.get("PERSONAGATE_GATEWAY_WORKER_SECRET"):
            secret = check_secret("PERSONAGATE_GATEWAY_WORKER_SECRET", value)
        elif (local := DEFAULT_STATE_DIR / WORKER_SECRET_FILE).is_file():
            secret = read_secrets(str(local), local)[0]
        else:
            secret = None
    except ValueError as exc:
        print(f"personagate: {exc}", file=sys.stderr)
        return None
    return WorkerAuth(secret=secret, ca_file=args.ca_file)


def _run_call(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    import soundfile

    from gateway.sip.caller import place_call
    from gateway.sip.ua import CLOCK_RATE

    if not args.uri.startswith(("sip:", "sips:")):
        print(f"personagate: {args.uri!r}: expected sip:NUMBER@HOST:PORT", file=sys.stderr)
        return 2
    play = None
    if args.play is not None:
        mono = _read_mono(args.play, CLOCK_RATE)
        if mono is None:
            return 2
        play = np.clip(np.round(mono * 32767), -32768, 32767).astype(np.int16)
    seconds = args.seconds or (len(play) / CLOCK_RATE if play is not None and len(play) else 5.0)
    dtmf = []
    for item in args.dtmf:
        digits, _, at = item.partition("@")
        try:
            dtmf.append((digits, float(at or 0)))
        except ValueError:
            print(f"personagate: --dtmf {item!r}: expected DIGITS@SECONDS", file=sys.stderr)
            return 2
    result = place_call(args.uri, play, seconds, host=args.host, timeout=args.timeout, dtmf=dtmf,
                        refer_answer=202 if args.accept_refer else 603, codecs=args.codec, user=args.user,
                        password=args.password or os.environ.get("PERSONAGATE_CALL_PASSWORD"),
                        transport=args.transport, srtp=args.srtp, ca_file=args.ca_file)
    if args.record is not None:
        soundfile.write(args.record, result.audio, CLOCK_RATE, subtype="PCM_16")
    print(json.dumps(result.report, indent=2))
    return 0 if result.report["answered"] else 1


def _read_mono(path: Path, rate: int):
    """A wav/flac file as mono float32 at ``rate``, or None after saying why it cannot be read."""
    import numpy as np
    import soundfile
    import soxr

    try:
        audio, source_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as exc:
        print(f"personagate: {path}: not a readable audio file ({exc})", file=sys.stderr)
        return None
    return soxr.resample(audio.mean(axis=1), source_rate, rate).astype(np.float32)


def _tenant_persona(name: str, tenants: Path) -> dict[str, object] | None:
    """The worker persona of ``TENANT/PERSONA`` in the tenants folder, or None after saying why."""
    from gateway.tenants.loader import TENANT_FILE, ClipCache, load_tenant

    tenant_id, _, persona_name = name.partition("/")
    if not tenant_id or not persona_name:
        print(f"personagate: --persona {name!r}: expected TENANT/PERSONA, e.g. harbor-mutual/claims", file=sys.stderr)
        return None
    tenant, problems = load_tenant(tenants / tenant_id, ClipCache(), label=f"{tenants / tenant_id / TENANT_FILE}")
    for problem in problems:
        print(problem, file=sys.stderr)
    if tenant is None:
        return None
    if persona_name not in tenant.personas:
        known = ", ".join(sorted(tenant.personas))
        print(f"personagate: tenant {tenant_id!r} has no persona {persona_name!r}; it has: {known}", file=sys.stderr)
        return None
    return tenant.personas[persona_name].worker_persona


def _run_tenants(args: argparse.Namespace) -> int:
    from gateway.tenants.loader import load_tenants

    result = load_tenants(args.folder)
    for problem in sorted(result.problems):
        print(problem)
    if result.problems:
        print(f"{len(result.problems)} problem(s) in {args.folder}", file=sys.stderr)
        return 1
    personas = sum(len(t.personas) for t in result.tenants.values())
    numbers = sum(len(t.spec.numbers) for t in result.tenants.values())
    print(f"{args.folder}: {len(result.tenants)} tenants, {personas} personas, {numbers} numbers: all valid")
    return 0


def _run_token(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gateway.admin.tokens import new_token
    from gateway.tenants.schema import TENANT_ID

    if args.operator == (args.tenant is not None):
        parser.error("tenants token: give a TENANT or --operator (not both)")
    if args.tenant is not None and not TENANT_ID.match(args.tenant):
        parser.error(f"tenants token: {args.tenant!r} is not a tenant id (lower-case letters, digits and '-')")
    token, line = new_token()
    who, holder = ("the operator (reaches every tenant)", "the operator") if args.operator else \
        (f"tenant {args.tenant!r}", "the tenant's admin")
    entry = f"operator:\n  - {line}" if args.operator else f"tenants:\n  {args.tenant}:\n    - {line}"
    print(f"Admin API token for {who}; shown only this once, hand it to {holder} now\n"
          f"(use it as 'Authorization: Bearer <token>'):\n\n    {token}\n\n"
          f"Add its hash to the admin tokens file (the gateway applies it without a restart):\n\n{entry}")
    return 0


def _run_gateway(args: argparse.Namespace) -> int:
    # One BLAS thread, before numpy loads: the gateway's matrix products are small (a call's 20 ms resampling), and
    # OpenBLAS's own threads would spin for each of them on every core, hundreds of calls at once.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    import logging

    import uvicorn

    from gateway.app import create_app
    from gateway.config import SettingsError, load_gateway_settings
    from personagate_common import logs
    from personagate_common.serving import GracefulServer, restarts_before_this_process

    try:
        settings = load_gateway_settings(args.config, tenants_dir=args.tenants, admin_tokens_file=args.admin_tokens,
                                         host=args.host, http_port=args.port, admin_port=args.admin_port,
                                         redis_url=args.redis_url,
                                         workers=args.worker, sip_host=args.sip_host, sip_port=args.sip_port,
                                         sip_enabled=True if args.sip or args.sip_port is not None else None)
    except SettingsError as exc:
        print(f"personagate: {exc}", file=sys.stderr)
        return 2
    if settings.sip_enabled and settings.recordings_dir is not None:
        from gateway.sip.server import check_recordings_dir

        try:
            check_recordings_dir(settings.recordings_dir)
        except RuntimeError as exc:
            print(f"personagate: {exc}", file=sys.stderr)
            return 2
    logs.configure(args.log_level)
    if args.log_level.lower() == "info":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per worker poll (every second)
    if os.environ.get("FORWARDED_ALLOW_IPS") is not None:  # uvicorn's own variable, which earlier docs named
        logging.getLogger("gateway").warning(
            "FORWARDED_ALLOW_IPS is not read: the gateway trusts X-Forwarded-For from forwarded_allow_ips "
            "(PERSONAGATE_GATEWAY_FORWARDED_ALLOW_IPS, now %s)", settings.forwarded_allow_ips)
    scheme = "https" if settings.http_tls_enabled else "http"
    admin_where = f"{settings.admin_host or settings.host}:{settings.admin_port} (its own listener)" \
        if settings.admin_port is not None else f"{settings.host}:{settings.http_port}"
    admin = "off (no admin_tokens_file)" if settings.admin_tokens_file is None else \
        f"{scheme}://{admin_where}/v1/admin (docs at /docs)"
    routing = "Redis" if settings.redis_url else "embedded, workers " + " ".join(settings.workers)
    sip = f"udp and tcp {settings.sip_host}:{settings.sip_port}" if settings.sip_enabled else "off"
    if settings.sip_enabled and settings.sip_tls_enabled:
        sip += f", tls {settings.sip_host}:{settings.sip_tls_port} (SRTP {settings.sip_srtp})"
    print(f"personagate gateway: tenants from {settings.tenants_dir}, admin API {admin}, routing {routing}, SIP {sip} "
          f"(SIGTERM drains calls for up to {settings.drain_seconds:g} s, Ctrl-C stops)", file=sys.stderr)
    app = create_app(settings)
    app.state.metrics.restarts.inc(restarts_before_this_process())
    calls = app.state.calls
    # forwarded_allow_ips: whose X-Forwarded-For becomes the client address (per-client limits, logs); always
    # given, so that uvicorn's own FORWARDED_ALLOW_IPS variable cannot override the validated setting.
    config = uvicorn.Config(app, host=settings.host, port=settings.http_port, log_config=None,
                            ssl_certfile=settings.http_tls_cert_file, ssl_keyfile=settings.http_tls_key_file,
                            forwarded_allow_ips=settings.forwarded_allow_ips)
    server = GracefulServer(config, drain=lambda: app.state.drain(settings.drain_seconds), stop=calls.stop)
    server.run()
    return 0 if server.started else 1


def _run_up(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.up import UpOptions, run_up

    _settings(args)  # refuse bad worker options here, before anything starts
    worker_args: list[str] = []
    for flag, value in (("--config", args.config), ("--model", args.model), ("--weights", args.weights),
                        ("--device", args.device), ("--slots", args.slots)):
        if value is not None:
            worker_args += [flag, str(value)]
    if args.greedy:
        worker_args.append("--greedy")
    options = UpOptions(host=args.host, worker_port=args.worker_port, http_port=args.http_port,
                        tenants=args.tenants, state_dir=args.state_dir, worker_args=tuple(worker_args),
                        redis_url=args.redis_url, sip_port=args.sip_port)
    return asyncio.run(run_up(options))


def _run_bench_sip(args: argparse.Namespace) -> int:
    from personagate_bench import sip as bench

    try:
        counts = [int(c) for c in args.calls.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or args.seconds < 5:
        print("personagate: --calls takes counts of at least 1 (e.g. 1,2,4) and --seconds at least 5",
              file=sys.stderr)
        return 2
    try:
        return bench.run(counts, args.seconds, as_json=args.json, gateway_cpu=args.gateway_cpu)
    except ValueError as exc:
        print(f"personagate: {exc}", file=sys.stderr)
        return 2


def _run_bench_routing(args: argparse.Namespace) -> int:
    from personagate_bench import routing as bench

    for name in ("workers", "slots", "claims", "concurrency"):
        if getattr(args, name) < 1:
            print(f"personagate: --{name} must be at least 1", file=sys.stderr)
            return 2
    bench.main(args.redis_url, workers=args.workers, slots=args.slots, claims=args.claims,
               concurrency=args.concurrency)
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from personagate_bench.worker import run_worker_bench

    if args.model == "echo":
        print("personagate: bench worker measures a model; the echo model has none (it measures the gateway)",
              file=sys.stderr)
        return 2
    if args.random_weights:
        if args.model != "personaplex" or args.weights is not None:
            print("personagate: --random-weights needs --model personaplex and no --weights", file=sys.stderr)
            return 2
        args.model = None  # the settings' model stays the default; the bench builds PersonaPlex itself
    settings = _settings(args)
    try:
        sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    except ValueError:
        print("personagate: --batch-sizes must be comma-separated integers", file=sys.stderr)
        return 2
    return run_worker_bench(
        settings, sizes, ticks=args.ticks, warmup=args.warmup, as_json=args.json, max_slots=args.max_slots,
        random_weights=args.random_weights,
    )


if __name__ == "__main__":
    sys.exit(main())
