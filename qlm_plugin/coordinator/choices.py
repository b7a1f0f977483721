"""Several choices of one request (OpenAI's ``n``) as that many requests of the coordinator.

Every layer below the front door holds one output per request (the queue, the journal, an engine's
relay), so a request for ``n`` choices is ``n`` requests with the same prompt and parameters, each
queued, placed, journaled and served on its own (an engine with prefix caching computes the shared
prompt once), and merged into one answer here: the choices in order, the prompt's tokens counted
once in the usage, as OpenAI and vLLM count them. Each choice has its own request id and SLO.

- **Seeds**: with a ``seed``, choice ``i`` is sampled with ``seed + i``, so the answer is
  reproducible and its choices differ (the same seed for each would make them the same).
- **All or nothing**: the first choice is accepted only where its tenant has room for all of them
  (``RequestSpec.choices``; more choices than the tenant may ever have unfinished is a 400). One
  refused all the same (others took the room meanwhile) cancels those accepted before it, which
  give up their idempotency keys, and the client gets that refusal; a choice that fails later
  fails the answer (whole: its error; streamed: an error event) and cancels the others.
- **Idempotency**: with a key, the first choice is kept under it and choice ``i`` under
  ``<key>#<i+1>``, each knowing ``n``: a retry with the key finds every choice, and the key sent
  again with another ``n`` is a conflict (422, naming ``n``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from qlm_plugin.coordinator.jobs import CHOICE_REFUSED, Chunk, Job
from qlm_plugin.coordinator.openai_params import INT64_MAX, integer
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

#: The most choices one request may ask for (OpenAI's own bound).
MAX_CHOICES = 128
#: Why the other choices of a request are cancelled when one is refused, or fails.
SIBLING_REFUSED = CHOICE_REFUSED
SIBLING_FAILED = "another choice of the same request failed"
#: Chunks of the choices waiting to be written to a slow client, before the choices wait for it.
MERGE_BUFFER = 64


def choices_asked(body: dict[str, Any]) -> int:
    """The number of choices a body asks for: ``n``, 1 when absent (:class:`BadRequest` when not an
    integer in [1, :data:`MAX_CHOICES`])."""
    value = body.get("n")
    return 1 if value is None else integer(value, "n", 1, MAX_CHOICES)


def choice_specs(spec: pb.RequestSpec, n: int) -> list[pb.RequestSpec]:
    """The ``n`` requests of one asking for ``n`` choices (the first is ``spec`` itself)."""
    if n == 1:
        return [spec]
    seed = spec.sampling.get("seed")
    specs = []
    for i in range(n):
        one = pb.RequestSpec()
        one.CopyFrom(spec)
        one.choices, one.choice = n, i
        if spec.idempotency_key and i:  # the first keeps the key: sent again with another n, a conflict
            one.idempotency_key = f"{spec.idempotency_key}#{i + 1}"
        if seed is not None and i:
            base = int(json.loads(seed))
            one.sampling["seed"] = str(base + i if base <= INT64_MAX - i else base - i)
        specs.append(one)
    return specs


async def first_failed(jobs: Sequence[Job]) -> Job | None:
    """Wait until every job has ended, or one has ended without finishing: that one, else None."""
    if len(jobs) == 1:
        await jobs[0].done.wait()
        return None if jobs[0].state == "finished" else jobs[0]
    waits = {asyncio.ensure_future(job.done.wait()): job for job in jobs}
    pending = set(waits)
    try:
        while pending:
            ended, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for wait in ended:
                if waits[wait].state != "finished":
                    return waits[wait]
        return None
    finally:
        for wait in pending:
            wait.cancel()


async def merged(follows: Sequence[AsyncIterator[Chunk]]) -> AsyncGenerator[tuple[int, Chunk | None]]:
    """The chunks of several choices as they come, each with its choice's index; ``(i, None)`` once
    choice ``i`` has no more (its last chunk, the one marked finished, is not passed on)."""
    if len(follows) == 1:  # one choice, the common case: no task, no queue
        async for chunk in follows[0]:
            if chunk.finished:
                break
            yield 0, chunk
        yield 0, None
        return
    queue: asyncio.Queue[tuple[int, Chunk | BaseException | None]] = asyncio.Queue(MERGE_BUFFER)

    async def pump(i: int, follow: AsyncIterator[Chunk]) -> None:
        try:
            async for chunk in follow:
                if chunk.finished:
                    break
                await queue.put((i, chunk))
        except Exception as exc:  # the reader raises it: a follower failing is not hidden
            await queue.put((i, exc))
            return
        await queue.put((i, None))

    pumps = [asyncio.create_task(pump(i, follow)) for i, follow in enumerate(follows)]
    try:
        left = len(pumps)
        while left:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                left -= 1
            yield i, item
    finally:
        for task in pumps:
            task.cancel()


def merged_usage(jobs: Sequence[Job]) -> dict[str, int]:
    """The usage of an answer of several choices: the prompt once, every choice's output."""
    prompt = jobs[0].request.prompt_tokens
    completion = sum(job.answered_tokens for job in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
