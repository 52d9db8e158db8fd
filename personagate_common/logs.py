"""Structured logs: one JSON object per line, with the ``extra`` fields of each record."""

from __future__ import annotations

import json
import logging
import sys
import time

# uvicorn adds `color_message` (its message with terminal colour codes) to its records.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName",
                                                                         "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# Paths that probes, pollers and scrapers ask for every second or so: a line each would bury everything else.
QUIET_PATHS = ("/v1/info", "/healthz", "/readyz", "/metrics")


class QuietPolls(logging.Filter):
    """Drops uvicorn's access lines for successful requests to ``QUIET_PATHS`` (errors on them still show)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) < 5:
            return True
        path, status = str(args[2]).split("?", 1)[0], args[4]
        return not (path in QUIET_PATHS and isinstance(status, int) and status < 400)


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(QuietPolls())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
