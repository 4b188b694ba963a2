"""DistFlow's errors: one base class, one subclass per way a transfer or a link can fail.

Every error names the peer (and its incarnation where known), so a caller's log says which TE and which
start of it the failure concerns.
"""

from __future__ import annotations


class FlowError(Exception):
    """Base of every DistFlow error."""


class LayoutMismatchError(FlowError):
    """The handshake found the two agents' layout descriptors incompatible; the link is refused."""


class PeerLostError(FlowError):
    """The link to a peer broke (connection closed or reset, peer process gone): pending transfers fail."""


class PeerRestartedError(PeerLostError):
    """The peer came back as a new incarnation: everything about the old one is void."""


class TransferTimeoutError(FlowError, TimeoutError):
    """A bounded wait ran out (the transfer may still complete) or a transfer's own deadline passed (it
    failed and its link was closed, as the peer stopped answering)."""


class TransferRejectedError(FlowError):
    """The peer refused a transfer (unknown region, out of bounds, wrong incarnation): the link stays up."""


class InvalidTransferError(FlowError, ValueError):
    """A transfer batch that cannot be sent (checked before any byte moves): unknown region, span out of
    bounds, negative length, overlapping destinations, a backend that cannot reach the region."""
