"""Positive declaration and exposure polling over anonymous connections (paper section 4).

Used by the engine and by ``fanny-tui declare-positive``; neither needs a session.

* :func:`declare` marks every stored token as part of a new positive upload (a fresh random
  upload ID, unrelated to the session ID) — nothing is deleted yet.
* :func:`upload_pending` sends each pending upload and deletes its tokens only once the broker
  acknowledged the durable commit (privacy invariant 6). If the ack never comes the tokens stay
  and are sent again later with the same upload ID (the broker answers retries idempotently).
* :func:`poll_once` fetches the positive tokens published since the stored cursor, compares them
  with the store locally, deletes the matches and reports the exposure (paper 4, step 4).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime

from .link import anonymous_connection
from .protocol.errors import MessageError
from .protocol.messages import (
    PositiveAck,
    Positives,
    PositivesPoll,
    PositiveToken,
    PositiveUpload,
)
from .protocol.tokens import new_id
from .store import TokenStore


@dataclass(frozen=True)
class PollResult:
    """What one poll brought: tokens received and stored tokens that matched (exposure)."""

    received: int
    matched: int


def declare(store: TokenStore) -> tuple[str, int]:
    """Start a positive declaration: mark every non-pending token with a new upload ID.

    Returns:
        ``(upload_id, count)``; ``count`` may be 0 (nothing to upload).

    Raises:
        StoreError: the store could not be written.
    """
    upload_id = new_id(os.urandom(16))
    tokens = store.begin_upload(upload_id)
    return upload_id, len(tokens)


async def upload_pending(store: TokenStore, url: str, *, timeout_s: float = 15.0,
                         ssl_context: ssl.SSLContext | None = None) -> list[tuple[str, int]]:
    """Upload every pending positive declaration; delete each one's tokens after its ack.

    Each upload goes on its own fresh anonymous connection.

    Returns:
        ``[(upload_id, deleted_count), ...]`` for the uploads acknowledged by this call.

    Raises:
        OSError, TimeoutError, websockets.WebSocketException: the broker could not be reached
            or dropped before acknowledging (the tokens of unacknowledged uploads are kept).
        BrokerRefused: the broker refused an upload (its tokens are kept).
        MessageError: the broker's answer was not a matching ``positive_ack``.
        StoreError: the store failed (nothing deleted that was not acknowledged).
    """
    done: list[tuple[str, int]] = []
    for upload_id, tokens in store.pending_uploads().items():
        message = PositiveUpload(
            upload_id=upload_id,
            tokens=[PositiveToken(token=t.token, expires_at=t.expires_at) for t in tokens],
        )
        async with anonymous_connection(url, timeout_s=timeout_s, ssl_context=ssl_context) as ch:
            answer = await ch.request(message)
        if not isinstance(answer, PositiveAck) or answer.upload_id != upload_id:
            raise MessageError("the broker's answer to the upload was not its positive_ack")
        done.append((upload_id, store.complete_upload(upload_id)))
    return done


async def poll_once(store: TokenStore, url: str, *, timeout_s: float = 15.0,
                    ssl_context: ssl.SSLContext | None = None, max_pages: int = 100) -> PollResult:
    """Fetch positives since the stored cursor, compare locally, delete matches.

    Returns:
        A :class:`PollResult`. ``matched > 0`` means an exposure; an alert was recorded in the
        store and the matched tokens deleted.

    Raises:
        OSError, TimeoutError, websockets.WebSocketException, BrokerRefused, MessageError,
        StoreError: as :func:`upload_pending`; the cursor only advances past compared pages.
    """
    received = matched = 0
    async with anonymous_connection(url, timeout_s=timeout_s, ssl_context=ssl_context) as ch:
        for _ in range(max_pages):
            answer = await ch.request(PositivesPoll(cursor=store.poll_cursor()))
            if not isinstance(answer, Positives):
                raise MessageError("the broker's answer to the poll was not positives")
            received += len(answer.tokens)
            matched += store.match_positives((t.token for t in answer.tokens), datetime.now(UTC))
            store.set_poll_cursor(answer.cursor)
            if not answer.more:
                break
    return PollResult(received=received, matched=matched)
