"""Text generation from the thinker: incremental decoding with a KV cache, sampling, and a no-cache oracle.

`generate` / `generate_steps` prefill a batch of prompts (with media) into a KV cache and decode
one token per row per step (omnicore.models.decode), choosing each token by `Sampling`: greedy
(temperature 0), or temperature, then top-k, then top-p, drawn with the caller's `torch.Generator`
(the order of transformers' logits warpers). A row stops at its first stop id (kept in the output,
as `generate` keeps the EOS); the batch stops when every row has stopped or after
`max_new_tokens`. Prompts are the thinker's batch dicts: a padded batch (left or right padding,
as the attention mask says) or a packed one; each row decodes from its own length, with no padding
in the cache, so a batch gives the tokens its prompts give one by one.

`greedy_generate` re-runs the whole sequence at every step (no cache, no rope-delta bookkeeping):
slow, obviously right, the oracle the cached path is tested against.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from typing import Any

import attrs
import torch

from omnicore.comm import LOCAL
from omnicore.config import ThinkerConfig
from omnicore.models.decode import CacheFullError, KVCache, allocate_cache, decode_step, decoder_params, prefill
from omnicore.models.thinker import ThinkerInputs, prepare_inputs, thinker_logits
from omnicore.ops import Ops, resolve
from omnicore.params import Params

__all__ = ["Sampling", "GREEDY", "Step", "next_token_probs", "choose_next", "generate_steps", "generate", "greedy_generate"]

_PER_PROMPT = ("input_ids", "attention_mask", "labels", "position_ids", "cu_seqlens")


def _non_negative(instance, attribute, value) -> None:
    if value < 0:
        raise ValueError(f"Sampling.{attribute.name} must be >= 0, got {value}")


def _probability(instance, attribute, value) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"Sampling.top_p must be in (0, 1], got {value}")


@attrs.frozen(kw_only=True)
class Sampling:
    """How the next token is chosen from its logits.

    temperature 0: greedy (argmax, the first index on ties; top_k / top_p unused). Otherwise the
    distribution is softmax(logits / temperature) restricted to the top_k most likely tokens
    (0: no limit; ties with the k-th value are kept), then to the smallest set of most likely
    tokens whose probability reaches top_p (1.0: no limit; the most likely token always stays),
    renormalised.
    """

    temperature: float = attrs.field(default=0.0, validator=_non_negative)
    top_k: int = attrs.field(default=0, validator=_non_negative)
    top_p: float = attrs.field(default=1.0, validator=_probability)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


def next_token_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The sampling distribution (B, V) in fp32 for logits (B, V); one-hot at the argmax when greedy."""
    logits = logits.float()
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is under top_p: the one that crosses it stays.
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_drop = before >= sampling.top_p
        drop = torch.empty_like(sorted_drop).scatter_(-1, order, sorted_drop)  # back to vocabulary order
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def choose_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row (B,) from logits (B, V); draws use `generator` (reproducible)."""
    if sampling.greedy:
        return logits.argmax(-1)
    probs = next_token_probs(logits, sampling)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@attrs.frozen
class Step:
    """One decoding step of a batch: the chosen `tokens` (B,), the `logits` (B, V) they came from,
    and `live` (B,) bool, the rows still generating (a stopped row's token is not part of its answer)."""

    tokens: torch.Tensor
    logits: torch.Tensor
    live: torch.Tensor


def _prompt_inputs(cfg: ThinkerConfig, batch: Mapping[str, Any] | ThinkerInputs) -> ThinkerInputs:
    if isinstance(batch, ThinkerInputs):
        return batch
    return prepare_inputs(cfg, {k: v for k, v in batch.items() if k != "labels"})


@torch.no_grad()
def generate_steps(
    params: Params,
    cfg: ThinkerConfig,
    batch: Mapping[str, Any] | ThinkerInputs,
    *,
    max_new_tokens: int,
    stop_ids: Collection[int] = (),
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
    cache: KVCache | None = None,
    max_positions: int | None = None,
    ops: Ops | None = None,
) -> Iterator[Step]:
    """Decode a batch of prompts step by step (see the module docstring), yielding every `Step`.

    `cache`: a preallocated `KVCache` with one row per prompt and room for the longest prompt plus
    `max_new_tokens` - 1 tokens; None allocates exactly that. `max_positions`: the model's position
    limit (config.json's `max_position_embeddings`), checked before any work. Over-long prompts
    raise `CacheFullError`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    inputs = _prompt_inputs(cfg, batch)
    ops = ops or resolve("auto", inputs.input_ids.device)
    longest, needed = inputs.segments.max_len, inputs.segments.max_len + max_new_tokens - 1
    if max_positions is not None and needed > max_positions:
        raise CacheFullError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's {max_positions} positions"
        )
    if cache is None:
        rows = len(inputs.segments.lengths)
        cache = allocate_cache(params, cfg, batch_size=rows, capacity=needed, device=inputs.input_ids.device)
    elif needed > cache.capacity:
        raise CacheFullError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new tokens needs {needed} cache slots, the KV cache has {cache.capacity}"
        )
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=inputs.input_ids.device)
    weights = decoder_params(params, cfg)
    logits = prefill(params, cfg, cache, inputs, ops=ops)
    live = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        tokens = choose_next(logits, sampling, generator)
        yield Step(tokens=tokens, logits=logits, live=live)
        live = live & ~torch.isin(tokens, stops)
        if step + 1 == max_new_tokens or not bool(live.any()):
            return
        logits = decode_step(weights, cfg, cache, tokens, ops=ops)


def generate(
    params: Params,
    cfg: ThinkerConfig,
    batch: Mapping[str, Any] | ThinkerInputs,
    *,
    max_new_tokens: int,
    stop_ids: Collection[int] = (),
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
    cache: KVCache | None = None,
    max_positions: int | None = None,
    ops: Ops | None = None,
) -> list[list[int]]:
    """New token ids of every prompt (its stop token included when reached); arguments as `generate_steps`."""
    out: list[list[int]] | None = None
    for step in generate_steps(
        params, cfg, batch, max_new_tokens=max_new_tokens, stop_ids=stop_ids, sampling=sampling,
        generator=generator, cache=cache, max_positions=max_positions, ops=ops,
    ):  # fmt: skip
        out = out or [[] for _ in range(step.tokens.shape[0])]
        for row, (token, live) in enumerate(zip(step.tokens.tolist(), step.live.tolist())):
            if live:
                out[row].append(token)
    return out or []


@torch.no_grad()
def greedy_generate(
    params: Params,
    cfg: ThinkerConfig,
    prompt: Mapping[str, torch.Tensor],
    *,
    max_new_tokens: int,
    stop_ids: Collection[int],
    ops: Ops | None = None,
    return_logits: bool = False,
) -> list[int] | tuple[list[int], torch.Tensor]:
    """New token ids (the stop token included when reached) after one prompt (`input_ids` (1, T)
    plus its media in the thinker's key names), by a full forward per step (no cache).
    With `return_logits`, also the logits each token was chosen from, (new tokens, V)."""
    media = {k: v for k, v in prompt.items() if k not in _PER_PROMPT}
    ids = prompt["input_ids"].reshape(-1).tolist()
    start, steps = len(ids), []
    for _ in range(max_new_tokens):
        batch = {"input_ids": torch.tensor([ids])} | media
        logits = thinker_logits(params, cfg, batch, ops=ops, comm=LOCAL)[0, -1]
        steps.append(logits)
        token = int(logits.argmax())
        ids.append(token)
        if token in stop_ids:
            break
    return (ids[start:], torch.stack(steps)) if return_logits else ids[start:]
