"""The step description every attention backend works from: built once per step by the model runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """How this step's flat token batch maps onto sequences and KV slots.

    Sequences come in batch order, decodes first (one token each, `num_decodes` of them), then prefill
    chunks. Sequence i computes `query_lens[i]` tokens at positions `seq_lens[i] - query_lens[i]` ..
    `seq_lens[i] - 1`; its K/V live in `block_tables[i]` (position p in block `p // block_size`, slot
    `p % block_size`). `slot_mapping[t]` is where token t's K/V are written, `positions[t]` its rope position.

    `cascade_blocks` > 0: every decode shares its first `cascade_blocks` blocks (a cached prefix, the same
    physical blocks), which a backend may attend once for all decodes (cascade attention), not once each.

    `prepared` holds the backend's own tensors for the step (`AttentionBackend.prepare`), read by every layer.
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    num_decodes: int
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    block_size: int
    cascade_blocks: int = 0
    prepared: Any = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
