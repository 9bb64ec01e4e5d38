"""Plain words for a failure that reaches a tester: what happened and what to do, in one line.

The broker link, uploads and polls fail with Python exceptions (``ConnectionRefusedError:
[Errno 111] Connect call failed ('127.0.0.1', 8765)``, ``SSLCertVerificationError: [SSL:
CERTIFICATE_VERIFY_FAILED] ...``); events carry that raw text as their ``reason``
(``broker_disconnected``, ``positive_pending``) so that scripts and logs keep it. A person gets
:func:`explain` instead: the same failure in plain words and the next step, one line, shared by
the command line and the Textual UI.

Pure: no I/O, no clock. It reads the exception's type (or, for a ``reason`` string, the type
name before the first ``": "``) and well-known message fragments of the standard library
(``ssl``, ``socket``, asyncio) and of websockets (``InvalidStatus``, ``InvalidMessage``,
``ConnectionClosed``), and the reasons made by :mod:`fanny_tui.link` (``no answer to hello``,
``connection closed (1001)``, ``broker refused: CODE: ...``). Anything else is kept as it was,
with a generic next step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Explanation", "explain", "explain_gps"]

_MAX_DETAIL = 160
_TYPE_PREFIX = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exceeded|Closed\w*|Invalid\w*|"
                          r"Timeout\w*|gaierror|herror))(?::\s*(.*))?$", re.DOTALL)
_HTTP_STATUS = re.compile(r"HTTP (\d{3})")
_REFUSED = re.compile(r"broker refused: ([a-z_]+)")
_BUSY_CODES = frozenset({"too_many_connections", "rate_limited"})


@dataclass(frozen=True)
class Explanation:
    """A failure in plain words.

    Attributes:
        what: what happened, for a person (no exception names), e.g. ``nothing accepts
            connections at ws://127.0.0.1:8765 (the broker is not running, or the host or port
            is wrong)``.
        todo: what to do next, at most 76 characters (two lines of a panel at 80 columns),
            e.g. ``start the broker, or check [broker] url``.
        detail: the raw reason, one line, cut at 160 characters (for logs and a "details"
            line); empty when there was none.
        headline: ``what`` in at most 40 characters and without the address, for a narrow
            panel (the Textual UI's Session panel at 80 columns), e.g. ``no broker answers at
            that address``; an HTTP status or a broker's refusal code is kept, in parentheses.
        kind: the exception type the raw reason named, e.g. ``ConnectionRefusedError`` (the
            short form of ``detail`` where a whole one does not fit); empty when it named none
            (a phrase such as ``no answer to hello``).
    """

    what: str
    todo: str
    detail: str = ""
    headline: str = ""
    kind: str = ""

    def __str__(self) -> str:
        """``"WHAT: TODO"``, one line."""
        return f"{self.what}: {self.todo}"


def explain(failure: BaseException | str, *, url: str | None = None) -> Explanation:
    """Explain a failure of the broker connection, an upload or a poll in plain words.

    Args:
        failure: the exception, or the ``reason`` text of an event as the engine makes it
            (``"TypeName: message"``, or a phrase such as ``"no answer to hello"``).
        url: the broker URL (``[broker] url``) to name in the explanation; None: "the broker's
            address".

    Returns:
        The :class:`Explanation`; ``str()`` of it is one line. Never raises.
    """
    kind, text = _split(failure)
    where = url or "the broker's address"
    lowered = text.lower()
    detail = _one_line(f"{kind}: {text}" if kind and text else kind or text)

    def made(headline: str, what: str, todo: str) -> Explanation:
        return Explanation(what, todo, detail, headline, kind)

    # TLS first: an SSL error is also an OSError, and its text mentions no errno.
    if any(s in lowered for s in ("mismatch", "doesn't match", "not valid for")) and (
            kind.startswith("SSL") or "certificate" in lowered):
        return made("certificate is for another host name",
                    f"the broker's TLS certificate is for another host name than in {where}",
                    "use in [broker] url the host name the certificate names")
    if kind == "SSLCertVerificationError" or "certificate verify failed" in lowered:
        if "expired" in lowered:
            return made("the broker's certificate has expired",
                        "the broker's TLS certificate has expired (or this device's clock "
                        "is wrong)", "renew the broker's certificate, or set this device's "
                        "clock")
        return made("the broker's certificate is not trusted",
                    "the broker's TLS certificate is not signed by a CA this device trusts",
                    "set [broker] ca_file to the deployment's CA certificate (PEM)")
    if "wrong version number" in lowered or "record layer failure" in lowered or (
            "packet length too long" in lowered):
        return made("the broker does not speak TLS",
                    f"the broker at {where} does not speak TLS",
                    "use ws:// in [broker] url, or start the broker with --certfile/--keyfile")
    if kind.startswith("SSL") or "[ssl" in lowered:
        return made("TLS with the broker failed", f"the TLS handshake with {where} failed",
                    "check the scheme and port in [broker] url and the broker's certificate")
    if (kind == "ConnectionRefusedError" or "connect call failed" in lowered
            or "errno 111" in lowered or "connection refused" in lowered):
        return made("no broker answers at that address",
                    f"nothing accepts connections at {where} (the broker is not running, "
                    "or the host or port is wrong)",
                    "start the broker, or check [broker] url")
    if kind in ("gaierror", "herror") or any(
            s in lowered for s in ("name or service not known", "nodename nor servname",
                                   "name resolution", "no address associated")):
        return made("the broker's host name is unknown",
                    f"the broker's host name in {where} cannot be resolved",
                    "check the host in [broker] url and this device's network (DNS)")
    if any(s in lowered for s in ("network is unreachable", "no route to host",
                                  "errno 101", "errno 113", "host is down")):
        return made("no network route to the broker", f"no network route to {where}",
                    "check this device's network connection (Wi-Fi, cable, mobile data)")
    if kind == "InvalidStatus" or "rejected websocket connection" in lowered:
        status = _HTTP_STATUS.search(text)
        code = int(status.group(1)) if status else 0
        http = f"HTTP {code}" if code else "HTTP"
        if code in (429, 502, 503, 504):
            return made(f"the broker is unavailable ({http})",
                        f"the broker at {where} (or its reverse proxy) is overloaded or "
                        f"unavailable ({http})",
                        "wait: the device retries by itself; if it lasts, check the broker")
        return made(f"not a FANNY broker ({http})",
                    f"{where} answered {http} instead of accepting a broker connection",
                    "check the path in [broker] url, and any reverse proxy in front of it")
    if kind in ("InvalidMessage", "InvalidHandshake", "InvalidUpgrade") or (
            "did not receive a valid http response" in lowered):
        return made("not a FANNY broker", f"{where} does not answer like a FANNY broker",
                    "check the scheme (ws:// or wss://) and the port in [broker] url")
    refused = _REFUSED.search(text)
    if refused:   # fanny_tui.link.BrokerRefused, also inside "bad answer to hello: ..."
        refusal = refused.group(1)
        if refusal == "unavailable":   # its board (SQLite, a region's PostgreSQL) failed
            return made("broker's positive board unavailable",
                        f"the broker at {where} could not use its positive-token board "
                        f"(unavailable)",
                        "wait: the device retries by itself; if it lasts, tell the broker's "
                        "operator")
        if refusal in _BUSY_CODES:
            return made(f"broker busy ({refusal})",
                        f"the broker at {where} is busy and turned this device away "
                        f"({refusal})",
                        "wait: the device retries by itself")
        return made(f"broker refused ({refusal})",
                    f"the broker at {where} refused this device ({refusal})",
                    "check that broker and device run the same kit version")
    if kind in ("TimeoutError", "CancelledError") or "timed out" in lowered or (
            lowered in ("timeout", "no answer to hello")):
        return made("the broker did not answer in time",
                    f"the broker at {where} did not answer in time",
                    "check this device's network; if it lasts, check that the broker runs")
    if "bad answer to hello" in lowered or "expected welcome" in lowered:
        return made("the broker's answer was not understood",
                    f"{where} did not answer the hello as a FANNY broker does",
                    "check [broker] url, and that broker and device run the same kit version")
    if kind == "ConnectionResetError" or "connection reset" in lowered:
        # Seen when opening: wss:// to a broker without TLS resets at the TLS hello.
        return made("the broker dropped the connection",
                    f"{where} dropped the connection as it opened (it may not speak TLS, or "
                    "not be a FANNY broker)",
                    "check the scheme (ws:// or wss://) and the port in [broker] url")
    if "connection closed (1001)" in lowered:    # the broker's server.close() (RFC 6455 7.4.1)
        return made("the broker is restarting or stopping",
                    f"the broker at {where} is restarting or stopping",
                    "nothing to do if it comes back: the device reconnects by itself")
    if (kind.startswith("ConnectionClosed") or kind in ("BrokenPipeError",
                                                        "ConnectionAbortedError")
            or "connection closed" in lowered or "closed by the broker" in lowered):
        return made("the connection to the broker dropped",
                    f"the connection to {where} was closed",
                    "nothing to do if it comes back: the device reconnects by itself")
    if kind == "ConnectionError" and "not connected" in lowered:
        return made("not connected to the broker",
                    f"the device is not connected to {where}",
                    "wait for the connection to come back (see the broker status)")
    if not detail:
        return made("an unknown failure", "an unknown failure",
                    "retry; if it lasts, check the log")
    return made("unexpected failure", f"unexpected failure ({detail})",
                "retry; if it lasts, check the log and report it")


def explain_gps(reason: str) -> Explanation:
    """Explain why there is no usable position, in plain words, with the next step.

    Args:
        reason: a ``gps_lost`` event's ``reason`` as :mod:`fanny_tui.gps` makes it: ``gpsd at
            HOST:PORT unreachable: Connection refused``, ``... did not answer within 5 s``,
            ``connection to ... lost: ...``, ``gpsd closed the connection``, ``no position
            from gpsd for 5 s``, ``no fix (gpsd mode 1)``, ``receiver in simulation mode
            (gpsd status 7)``, ``no fix in the NMEA log (...)``.

    Returns:
        The :class:`Explanation` (``headline`` at most 26 characters, for the GPS half of the
        Session panel at 80 columns; ``todo`` at most 76). Never raises.
    """
    text = reason.strip()
    lowered = text.lower()
    detail = _one_line(text)

    def made(headline: str, what: str, todo: str) -> Explanation:
        return Explanation(what, todo, detail, headline)

    if "unreachable" in lowered and any(s in lowered for s in ("refused", "errno 111",
                                                               "connect call failed")):
        return made("gpsd is not running", "nothing accepts connections at gpsd's address "
                    "(gpsd is not running, or the host or port is wrong)",
                    "start gpsd (sudo systemctl start gpsd), or check [gps] host and port")
    if "unreachable" in lowered or "did not answer" in lowered:
        return made("gpsd does not answer", "gpsd cannot be reached at its address",
                    "check that gpsd runs (systemctl status gpsd) and [gps] host and port")
    if ("connection to" in lowered and "lost" in lowered) or "closed the connection" in lowered:
        return made("gpsd went away", "the connection to gpsd was lost",
                    "nothing to do if it comes back: reconnecting; else restart gpsd")
    if "no position from gpsd" in lowered:
        return made("gpsd sends no position", "gpsd answers but sends no position",
                    "check the receiver is plugged in and seen by gpsd (run cgps)")
    if "receiver in" in lowered or "not measured" in lowered:
        return made("position not measured", "the receiver reports a position it did not "
                    "measure (dead reckoning, time only or simulation mode)",
                    "check the receiver's mode with cgps; set it to normal GNSS operation")
    if "nmea" in lowered:
        return made("no fix in the NMEA log", "the NMEA log has no usable fix here",
                    "check [gps] path: a log recorded with a fix (RMC status A)")
    if "no fix" in lowered:
        return made("the receiver has no fix", "the GPS receiver has no position fix yet",
                    "go outdoors, clear view of the sky; a first fix can take minutes")
    return made("no usable position", f"no usable position ({detail})" if detail else
                "no usable position", "check the receiver and gpsd (cgps); see the log")


def _split(failure: BaseException | str) -> tuple[str, str]:
    """``(type name, message)`` of an exception or of a ``"TypeName: message"`` reason."""
    if isinstance(failure, BaseException):
        return type(failure).__name__, str(failure)
    found = _TYPE_PREFIX.match(failure.strip())
    if found:
        return found.group(1).rsplit(".", 1)[-1], found.group(2) or ""
    return "", failure.strip()


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_DETAIL else line[:_MAX_DETAIL - 1] + "…"
