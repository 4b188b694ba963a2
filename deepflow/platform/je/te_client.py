"""A job executor's connection to one TE: the `EngineCoreClient` protocol over a DEALER socket.

The TE is not our child: the cluster manager owns it and tells us (`mark_dead`) when it dies or is replaced.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from deepflow.engine.core_client import (
    AbortRequests,
    AddRequest,
    Command,
    EngineCoreFailed,
    EngineDeadError,
)
from deepflow.engine.kv_transfer import KVTransfer
from deepflow.engine.request import EngineCoreOutputs, EngineCoreRequest
from deepflow.platform import messages as m


class RemoteTEClient:
    def __init__(self, info: m.TEInfo, je_id: str, context: zmq.asyncio.Context) -> None:
        self.info = info
        self.te_id = info.te_id
        self.max_model_len = info.max_model_len
        self.eos_token_ids = tuple(info.eos_token_ids)
        self.model_path = Path(info.model_path)
        self.num_kv_blocks = info.num_kv_blocks
        self._socket = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.IDENTITY, je_id.encode())
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, 0)  # the TE's outputs are never dropped on the way in
        self._socket.connect(info.address)
        self._socket.send(m.encoder.encode(m.Hello(je_id=je_id, incarnation=os.getpid())), flags=zmq.NOBLOCK)
        self.dead: str | None = None

    @property
    def pid(self) -> int:
        return self.info.pid

    def mark_dead(self, reason: str) -> None:
        """The cluster manager says this TE is gone: readers stop waiting for it."""
        if self.dead is None:
            self.dead = reason

    def is_alive(self) -> bool:
        return self.dead is None

    def _send(self, command: Command) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"TE {self.te_id} is dead: {self.dead}")
        try:
            self._socket.send(m.encoder.encode(command), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            raise EngineDeadError(f"TE {self.te_id} is not reachable: {exc}") from exc

    def add_request(self, request: EngineCoreRequest, kv_transfer: KVTransfer | None = None) -> None:
        """Send a request; `kv_transfer` makes it one side of a disaggregated request (KVConsume on a
        decode TE, KVProduce on a prefill TE: engine/kv_transfer.py). The one place the platform attaches
        it: on the request where the engine carries it there, else on the AddRequest."""
        if kv_transfer is None:
            self._send(AddRequest(request))
        elif "kv_transfer" in EngineCoreRequest.__struct_fields__:
            self._send(AddRequest(msgspec.structs.replace(request, kv_transfer=kv_transfer)))
        else:
            self._send(AddRequest(request, kv_transfer=kv_transfer))  # type: ignore[call-arg]

    def abort(self, request_ids: list[str]) -> None:
        with contextlib.suppress(EngineDeadError):
            self._send(AbortRequests(request_ids))

    def send(self, command: Command) -> None:
        self._send(command)

    async def get_outputs(self) -> EngineCoreOutputs:
        while True:
            if self.dead is not None:
                raise EngineDeadError(f"TE {self.te_id}: {self.dead}")
            if await self._socket.poll(timeout=100):
                if self.dead is not None:  # declared dead while we waited: what it sent is void
                    raise EngineDeadError(f"TE {self.te_id}: {self.dead}")
                message = m.te_to_je.decode(await self._socket.recv())
                if isinstance(message, EngineCoreFailed):
                    self.dead = f"engine failed: {message.error.strip().splitlines()[-1]}"
                    raise EngineDeadError(f"TE {self.te_id}: {self.dead}")
                return message

    def shutdown(self) -> None:
        """Close our connection; the TE itself is the cluster manager's to stop."""
        self.mark_dead("job executor shut down")
        if not self._socket.closed:
            self._socket.close(linger=0)
