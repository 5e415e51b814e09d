"""Freezing a worker process (SIGSTOP) at a chosen moment: how the tests make a worker hang while it holds jobs."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from imgserve.protocol import Job
from tools.processes import Child, Worker, wait_until
from tools.queues import Queues


def freeze(child: Child) -> None:
    """SIGSTOP a process and return once every one of its threads has stopped."""
    pid = child.process.pid
    os.kill(pid, signal.SIGSTOP)

    def all_stopped() -> bool:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that just ended
                continue
        return all(state in ("T", "t") for state in states)

    wait_until(all_stopped, 10, "the process to stop", interval=0.005)


def freeze_holding_jobs(child: Worker, queue: Queues, timeout: float = 120) -> list[Job]:
    """Freeze a worker at a moment when it holds claimed jobs it has not published yet; return those jobs."""
    worker = child.id
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if queue.inspect.claimed(worker):
            freeze(child)
            held = [Job.from_json(raw) for raw in queue.inspect.claimed(worker)]
            # Results are written before the acknowledgement: a job caught in between is published already.
            published = held and queue.redis.exists(*(queue.keys.result(job.origin, job.id) for job in held))
            if held and not published:
                return held
            os.kill(child.process.pid, signal.SIGCONT)  # acknowledged or published in between: try again
        time.sleep(0.005)
    pytest.fail(f"worker never held a job within {timeout} s")
