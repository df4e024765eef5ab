"""The SMTP engine: aiosmtpd's protocol with the bridge's handler, as aiosmtpd
itself keeps ``smtp.py`` apart from ``handlers.py``.

- :mod:`.protocol`: :class:`BridgeSMTP`, the session (admission, PROXY,
  timers, replies, shutdown); :mod:`.tls_session`: its STARTTLS and implicit
  TLS; :mod:`.lmtp`: :class:`BridgeLMTP`, its LMTP twin;
- :mod:`.handler`: :class:`BridgeHandler`, the policy (AUTH, MAIL, RCPT, DATA);
- :mod:`.data`: the DATA reader, a function of a stream;
- :mod:`.limits`: connection and command limits;
- :mod:`.runtime`: what one session works with (config, router, TLS context);
- :mod:`.wording`: enhanced status codes, client text escaped in replies;
- :mod:`.proxy`: the PROXY protocol header;
- :mod:`.compat`: every private name of aiosmtpd, asyncio and email used, checked
  against the installed aiosmtpd at import.
"""

from __future__ import annotations

from .handler import BridgeHandler
from .limits import ConnectionTracker
from .lmtp import BridgeLMTP
from .protocol import BridgeSMTP
from .runtime import Runtime

__all__ = ["BridgeHandler", "BridgeLMTP", "BridgeSMTP", "ConnectionTracker", "Runtime"]
