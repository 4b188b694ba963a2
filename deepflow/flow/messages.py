"""DistFlow's wire protocol: typed msgspec messages in length-prefixed frames on one TCP connection.

    initiator ──▶ target:  Hello                         (layout, digest, regions, host, incarnation)
    target ──▶ initiator:  Welcome | Refused             (Refused names the mismatch, then closes)
    initiator ──▶ target:  WriteRequest [+ payload]      (payload = the source spans' bytes, in order;
                                                           none when the bytes were copied in place (shm))
                           ReadRequest                   (the target's spans to send back)
    target ──▶ initiator:  Ack [+ payload]               (payload = the read spans' bytes; error → none)

A frame is `!II` (message bytes, payload bytes), the msgpack message, then the raw payload — read by the
receiver straight into the destination region's memory. The connection belongs to one initiator; the
target answers requests in order on it.
"""

from __future__ import annotations

import socket
import struct

import msgspec
import numpy as np

from deepflow.flow.layout import LayoutDescriptor
from deepflow.flow.regions import RegionInfo
from deepflow.flow.spans import Span

PROTOCOL_VERSION = 1
FRAME = struct.Struct("!II")
MAX_MESSAGE = 64 << 20  # a frame header claiming more is garbage, not a request


class Hello(msgspec.Struct, tag="hello", kw_only=True):
    protocol: int
    name: str
    incarnation: str
    host_id: str
    layout: LayoutDescriptor
    layout_digest: str
    regions: list[RegionInfo]
    mooncake_endpoint: str | None = None  # this agent's Mooncake engine, when it runs one


class Welcome(msgspec.Struct, tag="welcome", kw_only=True):
    name: str
    incarnation: str
    host_id: str
    layout: LayoutDescriptor
    layout_digest: str
    regions: list[RegionInfo]
    mooncake_endpoint: str | None = None


class Refused(msgspec.Struct, tag="refused", kw_only=True):
    name: str
    incarnation: str
    reason: str


class WriteRequest(msgspec.Struct, tag="write", kw_only=True):
    transfer_id: int
    target_incarnation: str
    spans: list[Span]  # destinations at the target
    in_place: bool  # the initiator already copied the bytes (shared memory): validate and acknowledge
    tag: str = ""


class ReadRequest(msgspec.Struct, tag="read", kw_only=True):
    transfer_id: int
    target_incarnation: str
    spans: list[Span]  # sources at the target
    in_place: bool  # the initiator copies them itself (shared memory): validate and acknowledge
    tag: str = ""


class Ack(msgspec.Struct, tag="ack", kw_only=True):
    transfer_id: int
    error: str | None = None


Handshake = Hello | Welcome | Refused
Request = WriteRequest | ReadRequest | Hello

encoder = msgspec.msgpack.Encoder()
handshake_decoder = msgspec.msgpack.Decoder(Welcome | Refused)
request_decoder = msgspec.msgpack.Decoder(Request)
ack_decoder = msgspec.msgpack.Decoder(Ack)

IOV_MAX = 1024  # buffers per sendmsg/recvmsg_into call (Linux's UIO_MAXIOV)


def frame(message: msgspec.Struct, payload_len: int = 0) -> bytes:
    body = encoder.encode(message)
    return FRAME.pack(len(body), payload_len) + body


def send_buffers(sock: socket.socket, buffers: list[memoryview | bytes]) -> None:
    """Send every buffer in order with gathered writes (one syscall for up to IOV_MAX buffers)."""
    bufs = [memoryview(b).cast("B") for b in buffers if len(b)]
    i = 0
    while i < len(bufs):
        sent = sock.sendmsg(bufs[i : i + IOV_MAX])
        while sent:
            n = len(bufs[i])
            if sent >= n:
                sent -= n
                i += 1
            else:
                bufs[i] = bufs[i][sent:]
                sent = 0


def recv_buffers(sock: socket.socket, buffers: list[memoryview]) -> None:
    """Fill every buffer in order with scattered reads; EOF before the end raises ConnectionError."""
    bufs = [b for b in buffers if len(b)]
    i = 0
    while i < len(bufs):
        got = sock.recvmsg_into(bufs[i : i + IOV_MAX])[0]
        if got == 0:
            raise ConnectionError("connection closed mid-payload")
        while got:
            n = len(bufs[i])
            if got >= n:
                got -= n
                i += 1
            else:
                bufs[i] = bufs[i][got:]
                got = 0


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    if n:
        recv_buffers(sock, [memoryview(buf)])
    return buf


def recv_frame(sock: socket.socket) -> tuple[bytes, int]:
    """The next frame's message bytes and payload length; ConnectionError on EOF or a garbled header."""
    header = bytearray(FRAME.size)
    view = memoryview(header)
    got = 0
    while got < FRAME.size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("connection closed")
        got += n
    msg_len, payload_len = FRAME.unpack(header)
    if msg_len > MAX_MESSAGE:
        raise ConnectionError(f"garbled frame header ({msg_len} message bytes)")
    return bytes(recv_exact(sock, msg_len)), payload_len


def drain(sock: socket.socket, n: int) -> None:
    """Read and discard `n` payload bytes (a refused write's), keeping the stream in step."""
    scratch = memoryview(bytearray(min(n, 1 << 20)))
    while n:
        chunk = scratch[: min(n, len(scratch))]
        recv_buffers(sock, [chunk])
        n -= len(chunk)


def views(pieces: list[np.ndarray]) -> list[memoryview]:
    return [memoryview(p) for p in pieces]
