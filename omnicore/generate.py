"""Greedy decoding by re-running the whole sequence at every step.

The simplest correct decoder: positions and media are recomputed from the growing token list each
step, so it needs no cache and no rope-delta bookkeeping. It costs a full forward per new token,
which is fine for tiny models and short answers (the demo); incremental decoding with a KV cache
is the inference issue's work.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from omnicore.comm import LOCAL
from omnicore.config import ThinkerConfig
from omnicore.models.thinker import thinker_logits
from omnicore.ops import Ops
from omnicore.params import Params

__all__ = ["greedy_generate"]

_PER_PROMPT = ("input_ids", "attention_mask", "labels", "position_ids", "cu_seqlens")


@torch.no_grad()
def greedy_generate(
    params: Params,
    cfg: ThinkerConfig,
    prompt: Mapping[str, torch.Tensor],
    *,
    max_new_tokens: int,
    stop_ids: Collection[int],
    ops: Ops | None = None,
) -> list[int]:
    """New token ids (the stop token included when reached) after one prompt (`input_ids` (1, T)
    plus its media in the thinker's key names)."""
    media = {k: v for k, v in prompt.items() if k not in _PER_PROMPT}
    ids = prompt["input_ids"].reshape(-1).tolist()
    start = len(ids)
    for _ in range(max_new_tokens):
        batch = {"input_ids": torch.tensor([ids])} | media
        token = int(thinker_logits(params, cfg, batch, ops=ops, comm=LOCAL)[0, -1].argmax())
        ids.append(token)
        if token in stop_ids:
            break
    return ids[start:]
