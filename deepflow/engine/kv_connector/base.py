"""What the two halves of the KV connector say to each other, and the DistFlow tags of a request's transfers.

Pure (msgspec only): the scheduler side imports it, and so does the runner side.

Tags. Every transfer a prefill TE makes for one reservation (a `KVSink`) is tagged with the sink's id and a
sequence number; the last one also carries the count, so the decode TE knows it has *every* byte only when it
holds the last one and all those before it (a write refused in the middle — a bounds check, a stale
incarnation — leaves a gap, and the request never decodes on it). A one-byte write tagged "abort" into the
decode TE's control region says the prefill side gave up: it comes after every data write on the same link
(DistFlow completes a link's transfers in order), so once it is seen no byte of that reservation is still
coming.

    kv:d:<seq>:<count or -1>:<sink id>    data; count on the last one only
    kv:a:0:-1:<sink id>                   the prefill side aborted
"""

from __future__ import annotations

import enum

import msgspec

TAG_PREFIX = "kv"
CTL_REGION = "kv_ctl"  # a small region every KV-transfer agent registers, for notices (abort)
CTL_BYTES = 64
KV_REGION = "kv"


class TagKind(enum.StrEnum):
    DATA = "d"
    ABORT = "a"


def make_tag(kind: TagKind, sink_id: str, seq: int = 0, count: int = -1) -> str:
    return f"{TAG_PREFIX}:{kind.value}:{seq}:{count}:{sink_id}"


def parse_tag(tag: str) -> tuple[TagKind, int, int, str] | None:
    """(kind, seq, count, sink id), or None for a tag that is not a KV connector's."""
    parts = tag.split(":", 4)
    if len(parts) != 5 or parts[0] != TAG_PREFIX:
        return None
    try:
        return TagKind(parts[1]), int(parts[2]), int(parts[3]), parts[4]
    except ValueError:
        return None


class SendStatus(enum.StrEnum):
    """A prefill request's transfers as the runner side reports them, once each; every status means that
    DistFlow will never touch the request's blocks again (so the scheduler may free them)."""

    DONE = "done"  # every write submitted and acknowledged by the decode TE
    FAILED = "failed"  # a write failed (or could not start); none is still moving bytes
    RELEASED = "released"  # the request was forgotten before it was done; nothing is still moving bytes


class KVConnectorOutput(msgspec.Struct, kw_only=True):
    """Runner side → scheduler side, drained at every engine step (empty when nothing happened)."""

    sends: dict[str, SendStatus] = msgspec.field(default_factory=dict)  # request id -> status
    send_errors: dict[str, str] = msgspec.field(default_factory=dict)  # request id -> why it failed
    received: list[str] = msgspec.field(default_factory=list)  # sink ids that now hold every byte
    peer_aborted: list[str] = msgspec.field(default_factory=list)  # sink ids whose prefill side gave up

    @property
    def empty(self) -> bool:
        return not (self.sends or self.received or self.peer_aborted)


class KVIdentity(msgspec.Struct, kw_only=True, frozen=True):
    """This engine's DistFlow agent, as a decode side names it in its `KVSink`s."""

    te_id: str
    agent_address: str
    incarnation: str
