"""Prefill/decode disaggregation: the messages between a job executor and the two engines of one request.

Pure (msgspec only). This module is the contract between the engine's KV connector (`engine/kv_connector/`)
and the JE's orchestration (`platform/je/`); the data itself moves over DistFlow (`deepflow/flow/`), peer to
peer, never through the JE.

One disaggregated request, as the JE drives it (the decode side reserves first, so that both modes — the
whole prompt's KV after the prefill, or each layer's as soon as it is written — push into blocks that exist):

    JE ──AddRequest(kv_transfer=KVConsume)──▶ D   D matches its own prefix cache, reserves blocks for the
                                                  prompt, and answers at once with one output carrying a
                                                  `KVSink` (no tokens). It waits (the RTC's populate-wait
                                                  state) for P's KV and the first token, bounded by
                                                  `KVConsume.timeout_s`; past it the request ends with
                                                  error_type "kv_timeout" and its blocks are freed.
    JE ──AddRequest(kv_transfer=KVProduce(sink))──▶ P
                                                  P prefills as usual (its own prefix cache matched), sends
                                                  the prompt blocks D does not hold (`sink.num_local_tokens`
                                                  on) into `sink.block_ids` — by request after the last
                                                  chunk, by layer as each layer is written — samples the
                                                  first token and streams it at once (an output with that
                                                  token, not finished). When D has acknowledged every byte,
                                                  P's request finishes (finish_reason "stop",
                                                  `kv_transferred=True`) and its blocks are released; a
                                                  failed or timed-out transfer ends it with error_type
                                                  "kv_transfer" instead. P holds its blocks at most
                                                  `KVProduce.lease_s` after its prefill, whatever happens.
    JE ──KVPrefilled(first token)──▶ D            D starts decoding once the first token is known *and*
                                                  every byte P sends has arrived (DistFlow's on_receive
                                                  for the transfers tagged with the request id); never
                                                  before. Its outputs are the tokens after the first.

Aborts travel both ways: the JE aborts the request on both TEs (an abort of an unknown id is a no-op); P
aborting mid-transfer fails D's wait at once (the request ends with error_type "kv_transfer"). Whatever
path a request takes, every block it reserved on either side is freed exactly once.

As implemented (engine/kv_connector/; additive to the above, no meaning changed):
- the request: `EngineCoreRequest.kv_transfer` (KVConsume | KVProduce | None); a TE runs with
  `EngineConfig.kv_transfer=True` (KV pool in /dev/shm, a DistFlow agent named `kv_agent_name`, the TE id).
  A PD request has n=1 and no pinned context; on a TE without kv_transfer it is rejected ("invalid").
- D's first output: `EngineCoreOutput(new_token_ids=[], kv_sink=KVSink(...))`, not finished, emitted by the
  step after the AddRequest (or later, first come first served, if D's pool has no room yet; the timeout
  runs from arrival either way). D reserves the prompt's blocks plus the first token's slot; `block_ids` are
  the prompt's only. `num_local_tokens` is a whole-block hit on D's device tier (no partial block, no host
  tier). `KVSink.sink_id` (new, optional) names the reservation: P tags its writes with it.
- P's outputs: one with `new_token_ids=[first]` (never finished, whatever the token: D applies the stop
  rules to it), then one with `new_token_ids=[]`, finish_reason "stop", `kv_transferred=True`. A failure:
  finish_reason "abort", error_type "kv_transfer", the reason in `stop_reason`. Both may come in one batch.
- D after `KVPrefilled`: outputs are the tokens after the first; if the first token alone ends the request
  (EOS, a stop id, max_tokens=1) D's next output is the final one, with no tokens. A KVPrefilled for an id D
  does not know, or before its sink, is ignored.
- Completion on D: P's writes are tagged `kv:d:<seq>:<count>:<sink_id>` (count on the last only); D counts
  them complete when it holds the last one and every one before it, so a write refused in the middle never
  lets it decode. P aborting after it started sending writes one byte tagged `kv:a:...` into D's control
  region (after its data writes on the same link), which fails D's wait at once.
- Blocks: P never frees (or lets the RTC reuse) a block while a DistFlow thread may still copy out of it
  (`TransferHandle.quiescent`), even past the lease, which makes a transfer's deadline the lease; P
  requests with writes are never preempted. A D request that ends before every byte arrived keeps its
  blocks in quarantine (`EngineConfig.kv_quarantine_s`, default 60 s) until P's last write or abort notice
  arrives, so that bytes of a dead request never land in blocks another request reuses; meanwhile its id
  is refused on D ("still in use").
"""

from __future__ import annotations

import enum

import msgspec

__all__ = ["KVConsume", "KVMode", "KVPrefilled", "KVProduce", "KVSink", "KVTransfer"]


class KVMode(enum.StrEnum):
    BY_REQUEST = "by_request"  # the whole prompt's KV leaves after the last prefill chunk
    BY_LAYER = "by_layer"  # each layer's K/V of a chunk leaves as soon as it is written


class KVSink(msgspec.Struct, kw_only=True, frozen=True):
    """Where a decode TE wants a request's prompt KV: its DistFlow agent and the blocks it reserved."""

    te_id: str
    agent_address: str  # the decode TE's TransferAgent, to `connect` to
    incarnation: str  # the agent's incarnation: a restarted decode TE refuses (and voids) old transfers
    block_ids: list[int]  # the decode TE's blocks for the prompt, in order (ceil(prompt_len / block_size))
    num_local_tokens: int  # prompt tokens (whole blocks) the decode TE already holds: sent from there on
    # This reservation's id, unique per decode TE incarnation: the prefill TE tags its transfers with it (not
    # with the request id), so bytes meant for an earlier reservation of a reused request id never count.
    sink_id: str = ""


class KVConsume(msgspec.Struct, kw_only=True, frozen=True, tag="consume"):
    """On a decode TE's request: the prompt's KV comes from a prefill TE."""

    mode: KVMode = KVMode.BY_REQUEST
    timeout_s: float = 30.0  # bound on waiting for the KV and the first token


class KVProduce(msgspec.Struct, kw_only=True, frozen=True, tag="produce"):
    """On a prefill TE's request: prefill, send the KV to `sink`, sample exactly one token."""

    sink: KVSink
    mode: KVMode = KVMode.BY_REQUEST
    lease_s: float = 30.0  # the longest P holds the request's blocks after its prefill


KVTransfer = KVConsume | KVProduce


class KVPrefilled(msgspec.Struct, kw_only=True, frozen=True, tag="kv_prefilled"):
    """JE → decode TE: the prefill side sampled `first_token_id` for `request_id` (a command, like an
    abort). The decode TE appends it as the request's first output token (not reported again)."""

    request_id: str
    first_token_id: int
