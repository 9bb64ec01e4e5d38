"""Positive declaration and exposure polling over anonymous connections (paper section 4).

Used by the engine and by ``fanny-tui declare-positive``; neither needs a session.

* :func:`declare` marks stored tokens as part of a new positive upload (a fresh random upload
  ID, unrelated to the session ID) with the declaration code that authorizes it (paper
  section 5) — nothing is deleted yet, and the code is kept with the upload so that a retry
  after a restart still carries it.
* :func:`upload_pending` sends each pending upload, padded to
  :data:`~fanny_tui.protocol.messages.UPLOAD_SIZE_BYTES`, and deletes its tokens only once the
  broker acknowledged the durable commit (privacy invariant 6). Without an ack the tokens stay
  and are sent again later with the same upload ID and code (the broker acknowledges a
  committed upload again without its consumed code). When the broker refuses the **code**
  (:data:`CODE_REFUSALS`) or the **content** for a reason that would not change on a retry
  (:data:`CONTENT_REFUSALS`: an expiry out of its window, too many tokens, a malformed
  message) the tokens stay on the device, un-marked, for a new declaration; that upload is
  never retried. Store reads and writes run in a worker thread, off the event loop.
* :func:`send_decoy` sends a decoy upload (cover traffic, ``[privacy] decoy_uploads``): random
  tokens, the same size as a real upload, on its own fresh connection; the broker answers and
  discards it, and nothing changes on the device.
* :func:`poll_once` fetches the positive tokens published since the stored cursor, compares them
  with the store locally, deletes the matches and reports the exposure (paper 4, step 4).

An upload holds at most :data:`~fanny_tui.protocol.messages.MAX_TOKENS_PER_UPLOAD` tokens, so a
bigger declaration is several uploads, each with its own upload ID and the same code and
**declaration secret** (256 random bits, :func:`~fanny_tui.protocol.codes.new_declaration`),
sent one after the other. A code is one declaration: the broker binds the code to the secret of
its first committed upload and accepts the code again only with that secret, for a short
continuation window (docs/protocol.md, ``positive_upload``); another device given the same code
is refused at once. The secret is kept in memory only, beside the pending uploads
(:meth:`~fanny_tui.store.TokenStore.declaration_for`): after a restart the remaining uploads of
a declaration whose first upload was committed are refused ``code_used``, and so is an upload
sent after the window; either keeps its tokens, un-marked, for a declaration with a new code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from .link import BrokerRefused, anonymous_connection
from .protocol.batch import BATCH_FORMAT, EndFrame, decode_batch_frame
from .protocol.codes import DECLARATION_RANDOM_BYTES, new_declaration, normalize_code
from .protocol.contact import ContactMeasures
from .protocol.errors import MessageError
from .protocol.expiry import DEFAULT_LIFETIME_DAYS, expiry_for
from .protocol.messages import (
    MAX_TOKENS_PER_UPLOAD,
    UPLOAD_SIZE_BYTES,
    PositiveAck,
    Positives,
    PositivesPoll,
    PositiveToken,
    PositiveUpload,
    encode_padded,
)
from .protocol.tokens import new_id
from .store import PendingUpload, PositivesCheck, TokenStore, UnrecordedMatchError

log = logging.getLogger(__name__)

CODE_REFUSALS = frozenset({"code_required", "code_invalid", "code_expired", "code_used"})
"""Broker refusals of an upload's declaration code: final for that upload (never retried)."""

CONTENT_REFUSALS = frozenset({"expiry_out_of_window", "too_many_tokens", "duplicate_token",
                              "bad_message"})
"""Broker refusals of an upload's content: the same upload would be refused again (an expiry
out of the broker's window, from a device clock off or a token lifetime longer than the broker
publishes; more tokens than an upload may carry; a malformed message), so they are final too."""

FINAL_REFUSALS = CODE_REFUSALS | CONTENT_REFUSALS
"""Refusals after which an upload is never retried: its tokens stay, un-marked."""

UPLOAD_TOO_LARGE = "too_many_tokens"
"""The refusal recorded when a pending upload is too large to be sent at all (checked here,
before the broker sees it: it does not fit in ``UPLOAD_SIZE_BYTES``)."""

DECOY_MAX_TOKENS = 40
"""Most random tokens in a decoy upload (its size on the wire is the same whatever the count)."""


@dataclass(frozen=True)
class PollResult:
    """What one poll brought: tokens received and stored tokens that matched (exposure)."""

    received: int
    matched: int


@dataclass(frozen=True)
class Declaration:
    """A positive declaration just recorded by :func:`declare`.

    Attributes:
        upload_ids: the uploads created, ``MAX_TOKENS_PER_UPLOAD`` tokens each at most.
        count: tokens marked for upload by this declaration.
    """

    upload_ids: tuple[str, ...]
    count: int


@dataclass(frozen=True)
class UploadOutcome:
    """The broker's final answer to one pending upload.

    Attributes:
        upload_id: the upload.
        count: tokens deleted (acknowledged) or kept and un-marked (refused).
        refused: the refusal code (one of :data:`FINAL_REFUSALS`) when the broker refused the
            upload for good, else None (acknowledged).
        message: the broker's one-line explanation of a refusal ("" when acknowledged).
    """

    upload_id: str
    count: int
    refused: str | None = None
    message: str = ""

    @property
    def acknowledged(self) -> bool:
        """True when the broker committed the upload and its tokens were deleted here."""
        return self.refused is None


def declare(store: TokenStore, code: str | None = None) -> Declaration:
    """Start a positive declaration: mark every token not already pending for upload.

    The tokens go in uploads of at most ``MAX_TOKENS_PER_UPLOAD`` (the most recent contacts in
    the first), each with a fresh random upload ID and the declaration code; with a code, the
    declaration secret that binds them is made here and kept in memory with the store
    (:meth:`~fanny_tui.store.TokenStore.declaration_for`; the one already kept for the same
    code, if some of its uploads are still pending).

    Args:
        store: the token store.
        code: the declaration code as typed (checked and normalized here; None: no code, for a
            broker with open declarations).

    Returns:
        The :class:`Declaration` (``count`` may be 0: nothing to upload; the code is then not
        recorded and stays unused).

    Raises:
        ValueError: the code is malformed (the message says how); nothing changed.
        StoreError: the store could not be written (the uploads marked before the failure
            stay pending and are sent; the other tokens stay unmarked).
    """
    normalized = normalize_code(code) if code is not None else None
    upload_ids: list[str] = []
    count = 0
    while True:
        upload_id = new_id(os.urandom(16))
        marked = store.begin_upload(upload_id, normalized, limit=MAX_TOKENS_PER_UPLOAD)
        if not marked:
            break
        upload_ids.append(upload_id)
        count += len(marked)
        if len(marked) < MAX_TOKENS_PER_UPLOAD:
            break
    if upload_ids and normalized is not None:
        store.declaration_for(normalized, new_declaration(os.urandom(DECLARATION_RANDOM_BYTES)))
    return Declaration(tuple(upload_ids), count)


def upload_message(pending: PendingUpload) -> PositiveUpload:
    """The wire message of a pending upload (its padding is added when sent): its code and,
    with a code, its declaration secret."""
    return PositiveUpload(
        upload_id=pending.upload_id, code=pending.code,
        declaration=None if pending.code is None else pending.declaration,
        tokens=[PositiveToken(token=t.token, expires_at=t.expires_at) for t in pending.tokens])


async def upload_pending(store: TokenStore, url: str, *, timeout_s: float = 15.0,
                         ssl_context: ssl.SSLContext | None = None,
                         on_outcome: Callable[[UploadOutcome], None] | None = None
                         ) -> list[UploadOutcome]:
    """Upload every pending positive upload; delete each one's tokens after its ack.

    Each upload goes on its own fresh anonymous connection, padded to ``UPLOAD_SIZE_BYTES``.
    A final refusal (:data:`FINAL_REFUSALS`: the code, or content the broker would refuse
    again) un-marks that upload's tokens (they stay on the device) and moves on to the next
    upload; so does an upload too large to be padded to ``UPLOAD_SIZE_BYTES`` (refusal
    :data:`UPLOAD_TOO_LARGE`, decided here without sending it). ``upload_conflict`` on a
    retried upload means that the broker committed it earlier with more tokens (some have
    expired here since, which only shrinks a pending upload): it counts as acknowledged.
    An upload with a code goes with the code's declaration secret kept in memory, or a fresh
    one kept from now on (after a restart).

    Args:
        store: the token store.
        url: the broker's ``ws://`` or ``wss://`` URL.
        timeout_s: seconds to connect, and to wait for each answer (the broker answers every
            upload after a constant minimum delay).
        ssl_context: for ``wss://`` (see :func:`~fanny_tui.link.ssl_context_for`).
        on_outcome: called with each final outcome as it happens (even if a later upload then
            fails).

    Returns:
        The :class:`UploadOutcome` of every upload answered by this call.

    Raises:
        OSError, TimeoutError, websockets.WebSocketException: the broker could not be reached
            or dropped before answering (the tokens of unanswered uploads are kept pending).
        BrokerRefused: the broker refused an upload for a passing reason (``rate_limited``,
            ``unavailable``...; not one of :data:`FINAL_REFUSALS`): its tokens are kept
            pending, to retry.
        MessageError: the broker's answer was not a matching ``positive_ack``.
        StoreError: the store failed (nothing deleted that was not acknowledged).
    """
    done: list[UploadOutcome] = []
    for pending in await asyncio.to_thread(store.pending):
        if pending.code is not None and pending.declaration is None:
            pending = replace(pending, declaration=await asyncio.to_thread(
                store.declaration_for, pending.code,
                new_declaration(os.urandom(DECLARATION_RANDOM_BYTES))))
        message = upload_message(pending)
        try:
            encode_padded(message, UPLOAD_SIZE_BYTES)
        except ValueError as exc:                 # would fail the same way on every retry
            kept = await asyncio.to_thread(store.abandon_upload, pending.upload_id)
            outcome = UploadOutcome(pending.upload_id, kept, UPLOAD_TOO_LARGE,
                                    f"the upload cannot be sent: {exc}")
            done.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
            continue
        try:
            async with anonymous_connection(url, timeout_s=timeout_s,
                                            ssl_context=ssl_context) as ch:
                answer = await ch.request(message, size=UPLOAD_SIZE_BYTES)
        except BrokerRefused as exc:
            if exc.error.code in FINAL_REFUSALS:
                kept = await asyncio.to_thread(store.abandon_upload, pending.upload_id)
                outcome = UploadOutcome(pending.upload_id, kept, exc.error.code,
                                        exc.error.message)
            elif exc.error.code == "upload_conflict":
                log.info("the broker already holds a larger version of a pending upload")
                outcome = UploadOutcome(pending.upload_id, await asyncio.to_thread(
                    store.complete_upload, pending.upload_id))
            else:
                raise
        else:
            if not isinstance(answer, PositiveAck) or answer.upload_id != pending.upload_id:
                raise MessageError("the broker's answer to the upload was not its positive_ack")
            outcome = UploadOutcome(pending.upload_id, await asyncio.to_thread(
                store.complete_upload, pending.upload_id))
        done.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return done


def decoy_upload(now: datetime, rng: random.Random | None = None) -> PositiveUpload:
    """A decoy positive upload: fresh upload ID, random plausible tokens (maybe none).

    The tokens are random 256-bit values with expiries a real device could hold (contacts of
    the last ``DEFAULT_LIFETIME_DAYS`` days, rounded up to the deletion hour); ``decoy`` is
    set, no code. Padded like a real upload when sent, so its size tells nothing.

    Args:
        now: the current instant, aware (UTC).
        rng: the randomness for counts and ages (default: the system's CSPRNG).
    """
    rng = rng or random.SystemRandom()
    tokens = []
    for _ in range(rng.randint(0, DECOY_MAX_TOKENS)):
        contact = now - timedelta(seconds=rng.uniform(0, (DEFAULT_LIFETIME_DAYS - 1) * 86_400))
        tokens.append(PositiveToken(token=os.urandom(32).hex(), expires_at=expiry_for(contact)))
    unique = {t.token: t for t in tokens}
    return PositiveUpload(upload_id=new_id(os.urandom(16)), tokens=list(unique.values()),
                          decoy=True)


async def send_decoy(url: str, *, timeout_s: float = 15.0,
                     ssl_context: ssl.SSLContext | None = None,
                     rng: random.Random | None = None) -> bool:
    """Send one decoy upload on a fresh anonymous connection and wait for its answer.

    Returns:
        True when the broker answered it (ack or refusal: either way it looked like an
        upload), False when the broker could not be reached or did not answer in time.
        Never raises for network trouble: cover traffic is best effort.
    """
    message = decoy_upload(datetime.now(UTC), rng)
    try:
        async with anonymous_connection(url, timeout_s=timeout_s, ssl_context=ssl_context) as ch:
            await ch.request(message, size=UPLOAD_SIZE_BYTES)
    except BrokerRefused as exc:
        log.debug("decoy upload refused: %s", exc.error.code)
        return True
    except Exception as exc:  # network trouble: no retry, the next decoy comes anyway
        log.debug("decoy upload not answered: %s", type(exc).__name__)
        return False
    return True


async def _record(store: TokenStore, check: PositivesCheck | None, cursor: int,
                  on_match: Callable[[int, list[ContactMeasures]], None] | None,
                  on_unrecorded_match: Callable[[set[str]], None] | None) -> int:
    """Record a bulk check in ONE transaction, in a worker thread (paper 4, step 4).

    Deletes only the stored tokens that matched, records one alert for them and moves the
    durable poll cursor to ``cursor``. Returns the number of stored tokens matched (0: none).
    Raises StoreError, after ``on_unrecorded_match`` when the write failed after a match.
    ``check`` None: no token arrived, only the cursor moves (an end frame's or empty page's).
    """
    if check is None:
        check = await asyncio.to_thread(store.positives_check)
    try:
        # shielded: a poll cancelled while it records still records (the thread would
        # anyway), and the caller's cancellation goes on once it is written
        found = await asyncio.shield(asyncio.to_thread(check.commit, cursor, datetime.now(UTC)))
    except UnrecordedMatchError as exc:
        if on_unrecorded_match is not None:
            on_unrecorded_match(set(exc.tokens))
        raise
    if found.matched and on_match is not None:
        on_match(found.matched, list(found.contacts))
    return found.matched


async def poll_once(store: TokenStore, url: str, *, timeout_s: float = 15.0,
                    ssl_context: ssl.SSLContext | None = None, max_pages: int = 100,
                    on_match: Callable[[int, list[ContactMeasures]], None] | None = None,
                    on_unrecorded_match: Callable[[set[str]], None] | None = None,
                    formats: tuple[str, ...] = (BATCH_FORMAT,)
                    ) -> PollResult:
    """Fetch positives since the stored cursor, compare them in bulk, delete the matches.

    The poll asks for the binary ``batch1`` form (``formats``): the broker streams every
    token after the cursor in frames of at most a few thousand tokens, then an end frame. A
    broker that does not know ``batch1`` answers JSON ``positives`` pages, read the same way.
    Each frame or page is compared in memory as it arrives (:meth:`TokenStore.positives_check`:
    a set intersection with the stored tokens, memory flat in the number published) and the
    outcome is recorded in ONE transaction per call, in a worker thread: the matched tokens
    deleted (only those), one alert, the durable cursor. When the poll is cut mid-stream (the
    connection drops, a frame is malformed, the call is cancelled), what was compared up to
    the last complete frame or page is recorded with that frame's cursor before the error is
    raised, so an interrupted catch-up resumes where it stopped.

    Args:
        store: the token store.
        url: the broker's URL.
        timeout_s: seconds to connect and to wait for each frame or page.
        ssl_context: for ``wss://``.
        max_pages: most polls sent on the connection in one call (a JSON page, or a binary
            answer the broker ended with ``more``).
        on_match: called once per call, after the transaction, with the number of stored
            tokens matched and their stored contact measures (those measured), when some
            matched (their alert is recorded) — even when the poll was cut and the error is
            then raised.
        on_unrecorded_match: called with the matching tokens when the store could not be
            written (disk full, read-only), before the StoreError is raised: the exposure is
            real even though it can be neither recorded nor the tokens deleted yet.
        formats: the answer formats accepted (``()``: JSON pages only, for debugging). A
            broker older than ``batch1`` refuses the ``accept`` field (``unknown_field``): the
            poll is then sent again without it, for JSON pages.

    Returns:
        A :class:`PollResult`. ``matched > 0`` means an exposure; an alert was recorded in the
        store and the matched tokens deleted.

    Raises:
        OSError, TimeoutError, websockets.WebSocketException, BrokerRefused, MessageError,
        StoreError: as :func:`upload_pending`; the cursor only advances past compared tokens.
    """
    first = cursor = await asyncio.to_thread(store.poll_cursor)
    check: PositivesCheck | None = None     # read from the store at the first token (a
    received = 0                            # poll with nothing new reads nothing more)
    try:
        async with anonymous_connection(url, timeout_s=timeout_s,
                                        ssl_context=ssl_context) as ch:
            for _ in range(max_pages):
                await ch.send(PositivesPoll(cursor=cursor, accept=list(formats)))
                more = True                    # poll again (unless the answer says otherwise)
                while True:
                    try:
                        answer = await ch.receive()
                    except BrokerRefused as exc:
                        if formats and exc.error.code == "unknown_field" \
                                and exc.error.field == "accept":
                            formats = ()   # a broker older than batch1: ask for JSON pages
                            break
                        raise
                    if isinstance(answer, Positives):       # one JSON page answers the poll
                        if answer.tokens:
                            if check is None:
                                check = await asyncio.to_thread(store.positives_check)
                            check.feed([t.token for t in answer.tokens])
                            received += len(answer.tokens)
                        cursor, more = answer.cursor, answer.more
                        break
                    if not isinstance(answer, bytes):
                        raise MessageError("the broker's answer to the poll was not positives")
                    frame = decode_batch_frame(answer)
                    if isinstance(frame, EndFrame):
                        cursor, more = frame.cursor, frame.more
                        break
                    if check is None:
                        check = await asyncio.to_thread(store.positives_check)
                    for _, tokens in frame.groups:          # raw 32-byte tokens
                        check.feed(tokens)                  # ~1 ms per 8192 tokens
                        received += len(tokens)
                    cursor = frame.cursor
                if not more:
                    break
    except (Exception, asyncio.CancelledError):
        if cursor != first:                   # keep what was compared, then re-raise
            await _record(store, check, cursor, on_match, on_unrecorded_match)
        raise
    matched = 0
    if cursor != first:
        matched = await _record(store, check, cursor, on_match, on_unrecorded_match)
    return PollResult(received=received, matched=matched)
