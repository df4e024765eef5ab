"""TLS for the SMTP listeners: the server context, TLS 1.2 or newer.

The context is built from ``smtp.tls.cert`` / ``key`` when the config is
loaded (so ``check-config`` catches a bad pair) and again for every
:class:`~smtp_bridge.smtp.runtime.Runtime`, so a SIGHUP reload picks up renewed
files for new sessions while established ones keep theirs.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from .errors import TlsError

__all__ = ["MINIMUM_VERSION", "TlsError", "server_context"]

#: RFC 8996 deprecates TLS 1.0 and 1.1; RFC 8314 4.1 asks for 1.2 or newer.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def _no_password() -> bytes:
    # Without a callback, OpenSSL prompts on the terminal for an encrypted key:
    # a daemon would hang. An empty password fails instead, with an error.
    return b""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for ``cert`` (PEM chain) and ``key`` (PEM, unencrypted)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    # Client-initiated renegotiation (TLS 1.2) costs the server a handshake per
    # request: a cheap CPU attack, and no SMTP client needs it.
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # SMTP clients rarely present certificates; the bridge does not ask for one.
    context.verify_mode = ssl.CERT_NONE
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            reason = exc.reason or "invalid PEM data"
            if reason == "KEY_VALUES_MISMATCH":
                raise TlsError(f"the key {key} does not belong to the certificate {cert}") from None
            raise TlsError(
                f"cannot load the certificate {cert} with the key {key}: {reason} "
                "(expected a PEM certificate chain and an unencrypted PEM private key)"
            ) from None
        raise TlsError(f"cannot read {exc.filename or cert}: {exc.strerror}") from None
    return context
