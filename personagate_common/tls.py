"""The certificate files of SIP over TLS, checked when the settings are loaded.

pjsua reads these files only when its TLS transport starts, and says little when one is wrong (a missing file is
``PJ_ENOENT``, a key that does not match its certificate an OpenSSL error code, an encrypted key a prompt on the
terminal). So the gateway loads them first with OpenSSL itself (Python's ``ssl``, the library pjsua's TLS is built
on) and turns each problem into a settings error that names the setting and the file. No pjsua import here: the
settings module uses this.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID


class _Encrypted(Exception):
    """Raised instead of a password: OpenSSL would otherwise ask for one on the terminal."""


def _no_password() -> bytes:
    raise _Encrypted


def check_readable(setting: str, path: Path) -> Path:
    """``path`` is a file this process can read; else a ValueError naming ``setting`` and the file."""
    try:
        with path.open("rb") as handle:
            head = handle.read(64 * 1024)
    except FileNotFoundError:
        raise ValueError(f"{setting} {str(path)!r}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{setting} {str(path)!r}: a folder, not a file") from None
    except OSError as exc:
        raise ValueError(f"{setting} {str(path)!r}: cannot be read ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in head:
        raise ValueError(f"{setting} {str(path)!r}: not a PEM file (expected -----BEGIN ...-----)")
    return path


def check_key_pair(cert_file: Path, key_file: Path, *,
                   settings: tuple[str, str] = ("sip_tls_cert_file", "sip_tls_key_file")) -> None:
    """The certificate (chain) and the private key load together; else a ValueError naming both ``settings``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert_setting, key_setting = settings
    files = f"{cert_setting} {str(cert_file)!r} and {key_setting} {str(key_file)!r}"
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except _Encrypted:
        raise ValueError(f"{key_setting} {str(key_file)!r}: the private key is encrypted; give the gateway an "
                         "unencrypted PEM key (openssl pkey -in KEY -out PLAIN-KEY) kept readable only by it") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise ValueError(f"{files}: the private key does not match the certificate") from None
        raise ValueError(f"{files}: OpenSSL cannot load them as a certificate and its private key "
                         f"({exc.reason or exc})") from None


def check_ca_file(ca_file: Path, *, setting: str = "sip_tls_ca_file") -> None:
    """``ca_file`` holds at least one CA certificate OpenSSL can load; else a ValueError naming ``setting``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise ValueError(f"{setting} {str(ca_file)!r}: OpenSSL cannot load CA certificates from it "
                         f"({exc.reason or exc})") from None
    if not context.get_ca_certs():
        raise ValueError(f"{setting} {str(ca_file)!r}: no CA certificate in it")


@dataclass(frozen=True)
class CertificateSummary:
    """What the start-up log says about the gateway's certificate."""

    subject: str
    not_after: datetime.datetime

    @property
    def expired(self) -> bool:
        return self.not_after <= datetime.datetime.now(datetime.UTC)


def certificate_summary(cert_file: Path) -> CertificateSummary:
    """The subject (its common name, else the whole name) and end of validity of the first certificate."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = str(names[0].value) if names else cert.subject.rfc4514_string()
    return CertificateSummary(subject=subject, not_after=cert.not_valid_after_utc)
