"""Structured logs (personagate_common/logs.py): what an operator reading a worker's or gateway's log sees."""

from __future__ import annotations

import io
import json
import logging

from personagate_common import logs


def test_polls_and_probes_leave_no_access_line_but_failures_and_other_requests_do() -> None:
    """The gateway reads each worker's /v1/info every second and Kubernetes probes /readyz: a line each would
    bury the log. A failing probe and every other request (the admin API, sessions) are still logged."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure()
        out = io.StringIO()
        root.handlers[0].stream = out  # type: ignore[attr-defined]
        access = logging.getLogger("uvicorn.access")
        line = '%s - "%s %s HTTP/%s" %d'
        access.info(line, "127.0.0.1:4000", "GET", "/v1/info", "1.1", 200)
        access.info(line, "127.0.0.1:4000", "GET", "/healthz?full=1", "1.1", 200)
        access.info(line, "127.0.0.1:4000", "GET", "/readyz", "1.1", 503)
        access.info(line, "127.0.0.1:4000", "PUT", "/v1/admin/tenants/acme/personas/sales", "1.1", 200)
        messages = [json.loads(entry)["msg"] for entry in out.getvalue().splitlines()]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert messages == ['127.0.0.1:4000 - "GET /readyz HTTP/1.1" 503',
                        '127.0.0.1:4000 - "PUT /v1/admin/tenants/acme/personas/sales HTTP/1.1" 200']
