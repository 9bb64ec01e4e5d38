"""The FANNY broker: proximity matching, signaling relay and the positive-token board.

The broker is the "intermediate" of the paper (section 3, steps 2-3; section 4, steps 2-4):

* :mod:`broker.state`      pure, in-memory: who is where (a proximity grid), match cooldowns,
                           signaling routes. No asyncio, no sockets, no files; takes ``now``.
* :mod:`broker.positives`  the positive-token board behind a small interface (SQLite today).
* :mod:`broker.server`     the websockets adapter: decode -> state/board -> encode; health check.
* :mod:`broker.__main__`   the ``fanny-broker`` command.

It imports :mod:`fanny_tui.protocol` (pure) and nothing else from :mod:`fanny_tui`: never
Textual, never aiortc. Session IDs and positions live in memory only; contact IDs never reach
the broker at all.

Errors refused on the wire are :class:`Refusal` (a
:class:`~fanny_tui.protocol.errors.RemoteProtocolError`) with a machine-readable ``code`` and
the failing ``field``; the server answers them with an ``error`` message.
"""

from __future__ import annotations

from fanny_tui.protocol.errors import RemoteProtocolError

__all__ = ["Refusal"]


class Refusal(RemoteProtocolError):
    """A client request the broker refuses; answered with a typed ``error`` message.

    The refusal never changes any state. Its text names what was wrong but never contains a
    session ID, a position or a token (it may be logged at DEBUG and is sent to the client).

    Attributes:
        code: short machine-readable reason (``"not_matched"``, ``"expiry_out_of_window"``...).
        field: dotted path of the failing field of the message (``"tokens[2].expires_at"``),
            or ``None``.
    """

    def __init__(self, message: str, *, code: str, field: str | None = None) -> None:
        super().__init__(message, code=code)
        self.field = field
