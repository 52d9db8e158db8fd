"""Writing tenant files: atomically, one writer per tenant at a time, every version kept for rollback.

A write goes to a temporary file in the same folder, is flushed to disk, renamed over the old file
(``os.replace``, atomic on POSIX) and the folder entry flushed too: a reader — the registry's poll, an
admin's editor, another gateway — sees the old file or the new one, never half of one.

Writers of one tenant take turns: an asyncio lock per tenant within this process (``lock``), and an
``flock`` on ``<tenant>/.history/lock`` across processes (``transaction``), held over read, validate
and write so that a check is never made against a file another writer is replacing.

History lives in ``<tenant>/.history/`` (a dot folder: the loader and the registry skip it):
``index.jsonl``, one JSON object per version, and ``blobs/<sha256>``, each content stored once. The
last ``history_versions`` versions of each file are kept. A file changed outside the admin API (by
hand, by git) is recorded as it was found before the next write over it, so rollback can return to
it too.

The methods other than ``lock`` block: call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

HISTORY = ".history"
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class NotWritable(Exception):
    """The tenants folder cannot be written here (read-only mount, permissions); the message says so."""


class VersionNotFound(KeyError):
    pass


@dataclass(frozen=True)
class Version:
    """One recorded content of one file of a tenant.

    ``action``: ``write`` (through the API), ``rollback`` (to ``from_version``), ``baseline`` (the
    file as found before the API first wrote it), ``external_edit`` (as found after a change made
    outside the API). ``actor``: ``operator``, ``tenant:<id>``, or ``filesystem`` for what was found.
    """

    version: int
    time: float
    actor: str
    file: str
    sha256: str
    size: int
    action: str
    from_version: int | None = None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file in the same folder, fsync, rename, fsync the folder.
    The file keeps its permission bits (a new one gets 0644)."""
    folder = path.parent
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class TenantStore:
    def __init__(self, root: Path, *, history_versions: int = 50) -> None:
        self.root = root
        self.history_versions = history_versions
        self._locks: dict[str, asyncio.Lock] = {}

    def folder(self, tenant: str) -> Path:
        return self.root / tenant

    def lock(self, tenant: str) -> asyncio.Lock:
        """This process's writers of ``tenant`` take turns on it (hold it around ``transaction``)."""
        return self._locks.setdefault(tenant, asyncio.Lock())

    @contextlib.contextmanager
    def transaction(self, tenant: str) -> Iterator[None]:
        """Exclusive access to ``tenant``'s files across processes. Raises NotWritable where the
        tenant folder is read-only."""
        history = self.folder(tenant) / HISTORY
        with self._writable(tenant, HISTORY):
            history.mkdir(exist_ok=True)
            fd = os.open(history / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self, tenant: str, file: str) -> bytes | None:
        try:
            return (self.folder(tenant) / file).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, tenant: str, file: str, data: bytes, *, actor: str, action: str = "write",
              from_version: int | None = None) -> Version:
        """Write one file of ``tenant`` atomically and record it (call within ``transaction``)."""
        folder = self.folder(tenant)
        path = folder / file
        index = self._index(tenant)
        now = time.time()
        with self._writable(tenant, file):
            current = self.read(tenant, file)
            recorded = [v for v in index if v.file == file]
            if current is not None and (not recorded or recorded[-1].sha256 != sha256(current)):
                found = "baseline" if not recorded else "external_edit"
                index.append(self._record(tenant, index, file, current, "filesystem", found, None, now))
            entry = self._record(tenant, index, file, data, actor, action, from_version, now)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
            index.append(entry)
            self._save_index(tenant, index)
        return entry

    def history(self, tenant: str) -> list[Version]:
        return self._index(tenant)

    def content(self, tenant: str, version: int) -> tuple[Version, bytes]:
        entry = next((v for v in self._index(tenant) if v.version == version), None)
        if entry is None:
            raise VersionNotFound(version)
        try:
            return entry, (self._blobs(tenant) / entry.sha256).read_bytes()
        except FileNotFoundError as exc:
            raise VersionNotFound(version) from exc

    # ------------------------------------------------------------------ internals

    def _blobs(self, tenant: str) -> Path:
        return self.folder(tenant) / HISTORY / "blobs"

    def _record(self, tenant: str, index: list[Version], file: str, data: bytes, actor: str, action: str,
                from_version: int | None, now: float) -> Version:
        digest = sha256(data)
        blob = self._blobs(tenant) / digest
        if not blob.exists():
            blob.parent.mkdir(exist_ok=True)
            atomic_write(blob, data)
        number = max((v.version for v in index), default=0) + 1
        return Version(number, now, actor, file, digest, len(data), action, from_version)

    def _index(self, tenant: str) -> list[Version]:
        try:
            text = (self.folder(tenant) / HISTORY / "index.jsonl").read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        versions = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError, TypeError):
                versions.append(Version(**json.loads(line)))
        return sorted(versions, key=lambda v: v.version)

    def _save_index(self, tenant: str, index: list[Version]) -> None:
        kept: list[Version] = []
        by_file: dict[str, int] = {}
        for entry in reversed(index):
            by_file[entry.file] = by_file.get(entry.file, 0) + 1
            if by_file[entry.file] <= self.history_versions:
                kept.append(entry)
        kept.reverse()
        text = "".join(json.dumps(asdict(v), sort_keys=True) + "\n" for v in kept)
        atomic_write(self.folder(tenant) / HISTORY / "index.jsonl", text.encode())
        referenced = {v.sha256 for v in kept}
        for blob in self._blobs(tenant).iterdir():
            if blob.name not in referenced and not blob.name.startswith("."):
                with contextlib.suppress(OSError):
                    blob.unlink()

    @contextlib.contextmanager
    def _writable(self, tenant: str, file: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            if exc.errno in _READ_ONLY_ERRNOS:
                raise NotWritable(
                    f"cannot write {tenant}/{file}: {exc.strerror.lower() if exc.strerror else exc}; the tenants "
                    f"folder is read-only for the gateway (a read-only mount, as the Kubernetes manifests' git "
                    f"checkout and any ConfigMap are): change the files where they come from (the tenants "
                    f"repository), or give the gateway a writable volume") from exc
            raise
