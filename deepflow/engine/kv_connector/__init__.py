"""The KV connector: prefill/decode disaggregation inside the engine, split the way vLLM's KV connector is.

- `scheduler` (pure: no torch, no sockets, the scheduler's clock): per-request state — which decode
  requests wait for remote KV (in the waiting queue, like a populate), how many prompt tokens are external
  (all past the decode TE's whole-block prefix hit, `KVSink.num_local_tokens`), and when a finished
  request's blocks may be freed (held while DistFlow may still touch them; every hold ends on a report or
  a deadline). `Scheduler` drives it; `_finish` stays the one exit path.
- `worker` (the runner side): the engine's DistFlow agent over its shared-memory KV pool; starts a prefill
  request's writes (by request after its last chunk, by layer from the model's per-layer hook), counts what
  arrives for a decode sink, and reports both (`base.KVConnectorOutput`), polled by the engine core.
- `base`: the messages between the two and the transfer tags.

The protocol with the job executor is `engine/kv_transfer.py`'s.
"""

from deepflow.engine.kv_connector.base import KVConnectorOutput, KVIdentity, SendStatus
from deepflow.engine.kv_connector.scheduler import (
    ConsumerState,
    HoldKind,
    KVConnectorScheduler,
    ProducerState,
)

__all__ = [
    "ConsumerState",
    "HoldKind",
    "KVConnectorOutput",
    "KVConnectorScheduler",
    "KVIdentity",
    "ProducerState",
    "SendStatus",
]
