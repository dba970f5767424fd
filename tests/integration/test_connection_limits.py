"""gRPC connection limits against a raw HTTP/2 client that never finishes its messages.

A gRPC message starts with a 5-byte prefix that announces its length; the server grants flow
control for the whole message and buffers what arrives until the message is complete. A
client that announces large messages and sends half of each, then idles, holds that memory in
the server for as long as its connection lives. The server settings bound it: at most
``max_concurrent_streams`` such messages per connection, for at most ``max_connection_age_s``
plus ``max_connection_age_grace_s``. Here such a client, written with ``h2`` the way any
HTTP/2 peer could, talks to ``alignd serve reward`` run as a child process, and the server's
resident memory is read from ``/proc``.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from h2.connection import ConnectionState
from h2.errors import ErrorCodes

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

MiB = 1024 * 1024
SCORE = "/alignd.v1.RewardService/Score"
ANNOUNCED = 48 * MiB
"""Length each half-sent message announces: below the default --max-message-bytes (64 MiB)."""
STREAMS = 8
WAIT_S = 30.0
ZEROS = bytes(MiB)
FRAME_HEADER = 9


def rss(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RawConnection:
    """A plaintext HTTP/2 client connection that opens gRPC calls and sends raw message bytes.

    Args:
        port: the server's port on 127.0.0.1.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config)
        self.authority = f"127.0.0.1:{port}"
        self.events: list[h2.events.Event] = []
        self.closed = False
        self._pending = bytearray()
        self.h2.initiate_connection()
        self.flush()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def start_call(self, path: str = SCORE) -> int:
        """Queues the HEADERS of a gRPC call (sent by the next :meth:`flush`); its stream id."""
        stream = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", self.authority), ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]  # fmt: skip
        self.h2.send_headers(stream, headers)
        return stream

    def read(self, timeout: float) -> None:
        """Handles what the server sends within ``timeout`` seconds: frames, or the close."""
        if self.closed or not select.select([self.sock], [], [], timeout)[0]:
            return
        try:
            data = self.sock.recv(MiB)
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return
        self._pending += data
        # Frame by frame: after a GOAWAY h2 refuses any further frame (the server still sends
        # pings and the cut calls' trailers), which would lose the events of a whole read.
        while len(self._pending) >= FRAME_HEADER:
            end = FRAME_HEADER + int.from_bytes(self._pending[:3], "big")
            if len(self._pending) < end:
                break
            frame, self._pending = self._pending[:end], self._pending[end:]
            if self.h2.state_machine.state is not ConnectionState.CLOSED:
                self.events.extend(self.h2.receive_data(bytes(frame)))
        self.flush()

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
        """Reads from the connection until ``condition()`` holds; fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not after {timeout:.0f}s; events {self.events[-5:]}")
            self.read(0.1)

    def seen(self, kind: type[h2.events.Event]) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def status(self, stream: int) -> str | None:
        """The grpc-status the server sent on ``stream`` (in trailers or a trailers-only
        response), or None yet."""
        for event in self.seen(h2.events.ResponseReceived) + self.seen(h2.events.TrailersReceived):
            if event.stream_id == stream:
                status = dict(event.headers).get("grpc-status")
                if status is not None:
                    return status
        return None

    def send_partial(self, streams: list[int], announced: int, sent: int) -> None:
        """On each stream, a message prefix announcing ``announced`` bytes, then ``sent`` bytes
        of the message, as fast as the server's flow control lets them through."""
        prefix = struct.pack(">BI", 0, announced)
        left = {stream: len(prefix) + sent for stream in streams}
        deadline = time.monotonic() + WAIT_S
        while left:
            progressed = False
            for stream, n in list(left.items()):
                window = self.h2.local_flow_control_window(stream)
                size = min(n, window, self.h2.max_outbound_frame_size, len(ZEROS))
                if size < len(prefix):
                    continue
                first = n == len(prefix) + sent
                data = prefix + ZEROS[: size - len(prefix)] if first else ZEROS[:size]
                self.h2.send_data(stream, data)
                left[stream] = n - size
                if not left[stream]:
                    del left[stream]
                progressed = True
            self.flush()
            if self.closed or time.monotonic() > deadline:
                pytest.fail(f"could not send the partial messages; {left} bytes left")
            self.read(0 if progressed else 0.1)


def test_memory_held_by_half_sent_messages_returns_when_the_connection_is_cut(start_reward):
    # glibc keeps the freed ~64 KiB read buffers resident until malloc_trim: the server trims
    # every 0.5 s here (every 60 s by default).
    age = ["--max-connection-age-s", "2", "--max-connection-age-grace-s", "1"]
    server = start_reward(*age, "--malloc-trim-interval-s", "0.5")
    pid = server.process.pid
    with RawConnection(server.port) as connection:
        connection.wait_for(
            lambda: connection.seen(h2.events.RemoteSettingsChanged), "server SETTINGS"
        )
        baseline = rss(pid)
        streams = [connection.start_call() for _ in range(STREAMS)]
        connection.send_partial(streams, ANNOUNCED, ANNOUNCED // 2)
        sent = STREAMS * ANNOUNCED // 2
        connection.wait_for(
            lambda: rss(pid) - baseline >= sent / 2, f"the server buffering {sent} bytes"
        )
        held = rss(pid)
        assert not connection.closed
        connection.wait_for(lambda: connection.closed, "the server cutting the connection")
    (goaway,) = connection.seen(h2.events.ConnectionTerminated)
    assert goaway.error_code == ErrorCodes.NO_ERROR
    growth = held - baseline
    deadline = time.monotonic() + WAIT_S
    while (after := rss(pid)) - baseline > growth / 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    log.info(
        "RSS MiB: baseline %.0f, held %.0f, after %.0f", baseline / MiB, held / MiB, after / MiB
    )
    assert after - baseline <= growth / 10, f"RSS {baseline=} {held=} {after=}"
    with server.client() as client:
        assert len(client.score(["Hi"], ["Hello"])) == 1


def test_streams_over_max_concurrent_streams_are_refused(start_reward):
    server = start_reward("--max-concurrent-streams", "2")
    with RawConnection(server.port) as connection:
        # Queued before the server's SETTINGS are read, which h2 would otherwise obey, and
        # sent after h2 acknowledged them (a stream over a limit not yet acknowledged gets
        # ENHANCE_YOUR_CALM instead).
        first, _, third = (connection.start_call() for _ in range(3))
        queued = connection.h2.data_to_send()
        connection.wait_for(
            lambda: connection.seen(h2.events.RemoteSettingsChanged), "server SETTINGS"
        )
        assert connection.h2.remote_settings.max_concurrent_streams == 2
        connection.sock.sendall(queued)
        connection.wait_for(
            lambda: connection.seen(h2.events.StreamReset), "the third stream refused"
        )
        (reset,) = connection.seen(h2.events.StreamReset)
        assert (reset.stream_id, reset.error_code) == (third, ErrorCodes.REFUSED_STREAM)
        # The streams within the limit are served: an empty request gets its status.
        connection.h2.send_data(first, struct.pack(">BI", 0, 0), end_stream=True)
        connection.flush()
        connection.wait_for(lambda: connection.status(first), "the first call's status")
        assert connection.status(first) == "3"  # INVALID_ARGUMENT: items must not be empty
