"""LMTP (RFC 2033): the SMTP session with LHLO, and one reply per recipient."""

from __future__ import annotations

from aiosmtpd.smtp import syntax

from .protocol import BridgeSMTP

__all__ = ["BridgeLMTP"]


class BridgeLMTP(BridgeSMTP):
    """LMTP (RFC 2033), for Postfix's ``lmtp`` transport: LHLO instead of
    HELO/EHLO, and after DATA one reply per accepted recipient, in RCPT order,
    each the docs/replies.md reply of that recipient's own API result."""

    banner_ident = "LMTP"
    per_recipient_replies = True

    @syntax("LHLO hostname")
    async def smtp_LHLO(self, hostname: str) -> None:
        await self._ehlo(hostname, "LHLO")

    async def smtp_EHLO(self, hostname: str) -> None:
        # RFC 2033 4.1: an LMTP server must not accept HELO or EHLO.
        await self.push('500 5.5.1 Command "EHLO" not recognized, use LHLO')

    async def smtp_HELO(self, hostname: str) -> None:
        await self.push('500 5.5.1 Command "HELO" not recognized, use LHLO')

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        return await super().check_helo_needed("LHLO")

    async def _push_data_replies(self, status: str, rcpts: list[str]) -> None:
        # handle_DATA leaves rcpt_replies when each recipient has its own truthful
        # answer (direct mode); otherwise the message's reply stands for every
        # recipient (refusals of the whole message, spooled mail).
        own = self.rcpt_replies or {}
        for rcpt in rcpts:
            reply = own.get(rcpt.lower())
            await self.push(reply.with_id(self.queue_id) if reply is not None else status)
