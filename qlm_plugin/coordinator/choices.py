"""Several choices of one request (OpenAI's ``n``), and several prompts of one completion, as that
many requests of the coordinator.

Every layer below the front door holds one output per request (the queue, the journal, an engine's
relay), so a request for ``n`` choices is ``n`` requests with the same prompt and parameters, each
queued, placed, journaled and served on its own (an engine with prefix caching computes the shared
prompt once), and merged into one answer here: the choices in order, the prompt's tokens counted
once in the usage, as OpenAI and vLLM count them. Each choice has its own request id and SLO.
A completion of ``k`` prompts (a list of texts or of token-id lists) is ``k * n`` requests, the
choices of prompt ``p`` at indexes ``p * n`` to ``p * n + n - 1`` (vLLM's order).

- **Seeds**: with a ``seed``, choice ``i`` of a prompt is sampled with ``seed + i``, so the answer
  is reproducible, its choices differ (the same seed for each would make them the same), and a
  prompt sent alone gets what it gets among others.
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
from qlm_plugin.coordinator.openai_params import INT64_MAX, BadRequest, integer
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

#: The most choices one request may ask for (OpenAI's own bound).
MAX_CHOICES = 128
#: The most requests one completion may make (its prompts times its choices).
MAX_REQUESTS = 1024
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


def choice_specs(
    spec: pb.RequestSpec, n: int, prompts: Sequence[str | list[int]] | None = None
) -> list[pb.RequestSpec]:
    """The requests of one asking for ``n`` choices of each of its ``prompts`` (None: its own one),
    in answer order (with one prompt and one choice, ``spec`` itself)."""
    total = n * (len(prompts) if prompts else 1)
    if total == 1:  # the common case: the request as it came, nothing copied
        return [spec]
    prompts = prompts or [spec.prompt or list(spec.prompt_token_ids)]
    if total > MAX_REQUESTS:
        raise BadRequest(
            "n", f"{len(prompts)} prompts of {n} choices are {total} requests, more than {MAX_REQUESTS}"
        )
    seed = spec.sampling.get("seed")
    specs = []
    for j in range(total):
        i = j % n
        one = pb.RequestSpec()
        one.CopyFrom(spec)
        prompt = prompts[j // n]
        if isinstance(prompt, str):
            one.prompt = prompt
            del one.prompt_token_ids[:]
        else:
            one.prompt = ""
            one.prompt_token_ids[:] = prompt
        one.choices, one.choice = total, j
        if spec.idempotency_key and j:  # the first keeps the key: sent again with another n, a conflict
            one.idempotency_key = f"{spec.idempotency_key}#{j + 1}"
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


def merged_usage(jobs: Sequence[Job], n: int = 1) -> dict[str, int]:
    """The usage of an answer of several choices (``n`` of each prompt): each prompt once, every
    choice's output."""
    prompt = sum(job.request.prompt_tokens for job in jobs[::n])
    completion = sum(job.answered_tokens for job in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
