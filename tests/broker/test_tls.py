"""wss:// on the broker: a throw-away CA (trustme), real TLS over loopback, real clients."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import trustme

from broker.__main__ import create_board, main
from broker.server import SetupError, server_ssl_context, start_broker
from fanny_tui.protocol.messages import PositiveAck, Positives, PositivesPoll, PositiveUpload
from tests.servers import broker_command, start_broker_process, stop_broker_process

from .kit import WALL_NOW, Client, FakeWall, healthz, new_id, positive, settings_for


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pem(tmp_path: Path, ca: trustme.CA) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 signed by the test CA: (certfile, keyfile)."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    return certfile, keyfile


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_wss_session_upload_and_healthz_over_https(tmp_path, pem, ca):
    certfile, keyfile = pem
    settings = settings_for(tmp_path, certfile=certfile, keyfile=keyfile)
    async with start_broker(settings, wall_clock=FakeWall(WALL_NOW)) as broker:
        assert broker.url == f"wss://127.0.0.1:{broker.port}"
        async with Client.open(broker.url, ssl=trusting(ca)) as a:
            await a.hello()
            tls = a.ws.transport.get_extra_info("ssl_object")
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            print(f"negotiated {tls.version()} {tls.cipher()[0]}")
            async with Client.open(broker.url, ssl=trusting(ca)) as anon:
                await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(1)]))
                assert (await anon.expect(PositiveAck)).count == 1
                await anon.send(PositivesPoll())
                assert len((await anon.expect(Positives)).tokens) == 1
            status, body = await healthz(broker.port, ssl=trusting(ca))
            assert status == 200 and body["sessions"] == 1 and body["declarations"] == "open"
        tls12 = trusting(ca)                               # TLS 1.2 exactly is accepted
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        async with Client.open(broker.url, ssl=tls12) as b:
            await b.hello()
            assert b.ws.transport.get_extra_info("ssl_object").version() == "TLSv1.2"


async def test_a_client_that_does_not_trust_the_ca_cannot_connect(tmp_path, pem, ca, caplog):
    caplog.set_level(logging.DEBUG)
    certfile, keyfile = pem
    async with start_broker(settings_for(tmp_path, certfile=certfile, keyfile=keyfile)) as broker:
        with pytest.raises(ssl.SSLCertVerificationError):
            async with Client.open(broker.url, ssl=ssl.create_default_context()):
                pass
        other = trustme.CA()                               # another CA: not ours either
        with pytest.raises(ssl.SSLCertVerificationError):
            async with Client.open(broker.url, ssl=trusting(other)):
                pass
        old = trusting(ca)                                 # our CA, but TLS 1.1 at most
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises((ssl.SSLError, OSError)):
            async with Client.open(broker.url, ssl=old):
                pass
        with pytest.raises(Exception):                     # noqa: B017 - plain ws:// to TLS
            async with Client.open(broker.url.replace("wss://", "ws://")):
                pass
        async with Client.open(broker.url, ssl=trusting(ca)) as good:   # still serving
            await good.hello()
        assert (await healthz(broker.port, ssl=trusting(ca)))[1]["status"] == "ok"
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
                     if not r.name.startswith("tests."))
    assert "127.0.0.1" not in text                         # failed handshakes log no address


def test_server_context_is_tls_1_2_or_later(tmp_path, pem):
    certfile, keyfile = pem
    context = server_ssl_context(settings_for(tmp_path, certfile=certfile, keyfile=keyfile))
    assert context is not None and context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert server_ssl_context(settings_for(tmp_path)) is None


async def test_unreadable_or_mismatched_tls_files_are_a_setup_error(tmp_path, pem, ca):
    certfile, keyfile = pem
    other_key = tmp_path / "other-key.pem"
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    for cert, key, needle in ((tmp_path / "missing.pem", keyfile, "missing.pem"),
                              (certfile, other_key, "cannot load"),
                              (garbage, keyfile, "cannot load")):
        with pytest.raises(SetupError, match=needle) as raised:
            async with start_broker(settings_for(tmp_path, certfile=cert, keyfile=key)):
                pass
        assert "BEGIN" not in str(raised.value)            # never the PEM content
    assert not list(tmp_path.glob("board.sqlite3*"))       # failed before opening the board


def test_cli_bad_tls_files_one_line_exit_2(tmp_path, capsys):
    create_board(tmp_path / "b.sqlite3")
    code = main(["serve", "--port", "0", "--db", str(tmp_path / "b.sqlite3"),
                 "--certfile", str(tmp_path / "nope.pem"), "--keyfile", str(tmp_path / "k.pem"),
                 "--log-level", "ERROR"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.pem" in err and "Traceback" not in err


async def test_cli_serves_wss_with_certfile_and_keyfile(tmp_path, pem, ca):
    certfile, keyfile = pem
    create_board(tmp_path / "b.sqlite3")
    process, url = await start_broker_process(
        "--port", "0", "--db", str(tmp_path / "b.sqlite3"), "--certfile", str(certfile),
        "--keyfile", str(keyfile), "--open-declarations", "--upload-answer-delay-s", "0")
    try:
        assert url.startswith("wss://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        status, body = await healthz(port, ssl=trusting(ca))
        assert status == 200 and body["declarations"] == "open"
        async with Client.open(url, ssl=trusting(ca)) as anon:
            await anon.send(PositivesPoll())
            await anon.expect(Positives)
        with pytest.raises(ssl.SSLCertVerificationError):
            async with Client.open(url, ssl=ssl.create_default_context()):
                pass
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    status, err, _ = await stop_broker_process(process, signal.SIGTERM)
    assert status == 0, err
    assert "tls=on" in err and "Traceback" not in err


def test_module_entry_point_is_the_same_command():
    done = subprocess.run([*broker_command(), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "issue-code" in done.stdout
    done = subprocess.run([sys.executable, "-m", "broker", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "issue-code" in done.stdout


async def test_healthz_without_tls_client_fails_on_a_tls_port(tmp_path, pem):
    certfile, keyfile = pem
    async with start_broker(settings_for(tmp_path, certfile=certfile, keyfile=keyfile)) as broker:
        with pytest.raises((ConnectionError, ValueError, IndexError, asyncio.IncompleteReadError,
                            OSError)):
            await healthz(broker.port)                     # plain HTTP to the TLS port
