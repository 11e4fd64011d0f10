"""`run_load`: open-loop Poisson load against one target, with a progress bar.

Each request is sent as its own task at its scheduled time, whether or not the
earlier ones have answered. If the generator itself falls behind (a busy
event loop, a busy machine), the actual send time shows it: every record keeps
both, and the result carries the generator's own CPU seconds and wall time, so
a report can show how much of the machine the load generator took.
"""

from __future__ import annotations

import asyncio
import resource
import time
from dataclasses import replace

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadtest.loadgen.mix import LoadRequest, PromptMix
from loadtest.loadgen.records import RequestRecord, RunResult
from loadtest.loadgen.schedule import poisson_schedule
from loadtest.loadgen.target import Target


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_load(
    target: Target,
    *,
    rps: float,
    duration_s: float,
    mix: PromptMix,
    seed: int = 0,
    progress: bool = True,
) -> RunResult:
    """Send Poisson(rps) arrivals for `duration_s` and wait for every answer.

    Starts the target if needed but does not close it (it may serve more runs).
    """
    schedule = poisson_schedule(rps, duration_s, seed)
    requests = mix.build(len(schedule), seed)
    await target.start()
    loop = asyncio.get_running_loop()
    records: list[RequestRecord] = []
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        disable=not progress,
        transient=False,
    ) as bar:
        task = bar.add_task(f"{target.name} @ {rps:g} rps", total=len(schedule), state="")
        counts = {"sent": 0, "done": 0, "errors": 0}

        def show() -> None:
            in_flight = counts["sent"] - counts["done"]
            state = f"sent {counts['sent']}, in flight {in_flight}, errors {counts['errors']}"
            bar.update(task, completed=counts["done"], state=state)

        async def one(offset: float, request: LoadRequest, origin: float) -> RequestRecord:
            record = await target.send(request)
            counts["done"] += 1
            counts["errors"] += not record.ok
            show()
            return replace(record, scheduled_s=offset, sent_s=record.sent_s - origin)

        started_unix = time.time()
        cpu_start = process_cpu_s()
        origin = time.perf_counter()
        tasks = []
        for offset, request in zip(schedule, requests, strict=True):
            delay = origin + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(one(offset, request, origin)))
            counts["sent"] += 1
            if counts["sent"] % 8 == 0:
                show()
        records = list(await asyncio.gather(*tasks))
        wall_s = time.perf_counter() - origin
        cpu_s = process_cpu_s() - cpu_start
        show()
    planted = sorted({pii for request in requests for pii in request.pii})
    return RunResult(
        target=target.name,
        rps=rps,
        duration_s=duration_s,
        seed=seed,
        records=records,
        generator_cpu_s=cpu_s,
        wall_s=wall_s,
        started_unix=started_unix,
        planted_pii=planted,
        target_info=target.info(),
    )
