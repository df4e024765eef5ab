"""The exceptions smtp-bridge raises, in one place.

Each lives beside the code that raises it; this module gathers them so callers
(and readers) see the whole tree::

    Exception
    +-- ConfigError          config.py      a config file is wrong; .issues lists
    |                                       every problem as file:line: key: what
    +-- StoreError           store/         the state store failed (disk full, read-only,
    |                                       database down); the reply is 451 4.3.0
    +-- StartupError         service.py     the daemon cannot start (port in use,
    |                                       store unopenable): exit code 2
    +-- ValueError
    |   +-- TlsError         tls.py         smtp.tls's certificate and key cannot be
    |                                       loaded (also a config error, at smtp.tls.cert)
    +-- TemplateRenderError  templating.py  a route's template failed for one
    |                                       recipient: 451 4.3.5, logged with route
    +-- HeaderOverrideError  templating.py  a malformed opt-in X-Template-* header:
                                            554 5.6.0 (the client's data is at fault)

IO failures of the API are not exceptions: ``ApiClient.send`` always returns an
``ApiResult`` and ``replies.reply_for`` turns it into the SMTP reply.
"""

from __future__ import annotations

from .config import ConfigError
from .service import StartupError
from .store import StoreError
from .templating import HeaderOverrideError, TemplateRenderError
from .tls import TlsError

__all__ = [
    "ConfigError",
    "HeaderOverrideError",
    "StartupError",
    "StoreError",
    "TemplateRenderError",
    "TlsError",
]
