"""Exception tree of the FANNY protocol core.

::

    FannyError                     base of everything raised on purpose by the kit
    ├── LocalProtocolError         we (the caller) misused the API: illegal transition, bad argument
    └── RemoteProtocolError        the other side sent something invalid
        └── MessageError           a wire message failed to decode or validate;
                                   ``field`` names the failing field when known

Remote errors carry a short machine-readable ``code`` so they can be answered with a typed
``error`` message on the wire (see docs/protocol.md).
"""

from __future__ import annotations


class FannyError(Exception):
    """Base class for every error the kit raises on purpose."""


class LocalProtocolError(FannyError):
    """The caller misused the API (for example an illegal handshake transition).

    The object that raised it is left unchanged.
    """


class RemoteProtocolError(FannyError):
    """The remote side (broker, peer or client) violated the protocol.

    Attributes:
        code: short machine-readable reason, e.g. ``"bad_message"``, ``"token_mismatch"``.
    """

    def __init__(self, message: str, *, code: str = "protocol_error") -> None:
        super().__init__(message)
        self.code = code


class MessageError(RemoteProtocolError):
    """A wire message could not be decoded or failed validation.

    Attributes:
        field: the dotted path of the failing field (``"tokens[3].token"``) or ``None``.
    """

    def __init__(
        self, message: str, *, field: str | None = None, code: str = "bad_message"
    ) -> None:
        super().__init__(message, code=code)
        self.field = field
