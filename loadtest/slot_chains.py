"""What the worker path adds to each request's first token, with the engine's own speed taken out.

With more streams than slots, a request's time to first token is mostly the
time the generations before it on its slot took. That time drifts by 10-30%
from run to run with the machine (bench-inference saw the end-to-end p50 beat
the direct one by 440 ms in one round and lose by 450 ms in the next), so the
raw p50 difference of two runs cannot resolve a few milliseconds.

What the worker itself puts in front of a first token can be read off its
completions instead (same host, so wall clocks agree): every hand-off gap on
the request's slot chain (a slot's generation ended, the next prompt was taken:
fetch, decode, attempt check) plus its own first-token delivery (taken to the
reader's first chunk, minus the engine's time to first token: start-up, chunk
produce, broker, reader fetch). The direct path has neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sluice.v1 import events_pb2


@dataclass(frozen=True)
class Generation:
    """One request on the worker, in wall-clock seconds."""

    taken: float  # the worker took the prompt (its completion envelope's event_time)
    first_token: float  # the engine produced its first token
    ended: float  # the engine produced its last token (its slot is free)
    delivered: float  # the reader saw its first chunk

    @classmethod
    def of(cls, completion: events_pb2.CompletionFinished, delivered: float) -> Generation:
        taken = completion.envelope.event_time.ToNanoseconds() / 1e9
        first = taken + completion.time_to_first_token_ms / 1000
        tokens = completion.usage.completion_tokens
        return cls(taken, first, first + completion.inter_token_ms * max(0, tokens - 1) / 1000, delivered)


@dataclass
class SlotChains:
    """Per request, what the worker added before its first token; and its parts, for the report."""

    added: dict[str, float]
    handoffs: list[float]  # each gap between a slot's generation ending and its next prompt taken
    deliveries: list[float]  # each request's taken-to-first-chunk minus the engine's time to first token


def added_before_first_token(generations: Mapping[str, Generation], sent: float, slots: int) -> SlotChains:
    """Per request: the worker's hand-off gaps on its slot chain plus its own first-token delivery.

    Requests are replayed in the order the worker took them; each one after the
    first `slots` took the slot of the running generation that ended first. The
    first `slots` requests' "gap" is from `sent` (all prompts produced) to taken.
    """
    chains: list[tuple[float, float]] = []  # (generation end, gaps so far) of each slot's latest request
    result = SlotChains({}, [], [])
    for request_id, g in sorted(generations.items(), key=lambda item: item[1].taken):
        if len(chains) < slots:
            gaps = g.taken - sent
        else:
            chains.sort()
            freed, before = chains.pop(0)
            result.handoffs.append(max(0.0, g.taken - freed))
            gaps = before + result.handoffs[-1]
        chains.append((g.ended, gaps))
        result.deliveries.append(g.delivered - g.first_token)
        result.added[request_id] = gaps + result.deliveries[-1]
    return result
