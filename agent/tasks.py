"""Named, held background tasks: none may vanish (mitmproxy's named, held tasks).

A supervised task that raises is logged (`task.failed`), shown in `/status`, and started again
after an exponential backoff with jitter. A task that keeps failing (`unready_after` times in a
row without reporting `ok`) cannot do its job: the agent is then not ready, with the task's
name and last error as the reason, until the task reports `ok` again. One-shot tasks (a reload)
are held until done and their failure is logged and recorded, not retried.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from agent.errors import MeshagentError
from agent.logs import get_logger

log = get_logger("meshagent.tasks")

Factory = Callable[[], Coroutine[Any, Any, None]]


def describe(exc: BaseException) -> str:
    """One line for logs and /status: a MeshagentError's code and message, else the repr."""
    if isinstance(exc, MeshagentError):
        return f"{exc.code}: {exc.message}"
    return repr(exc)[:300]


def backoff_s(failing: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Seconds before restart number `failing` (1, 2, ...): doubling from base, capped, jittered
    down to half so a fleet that failed together does not retry together."""
    ceiling = min(cap_s, base_s * 2.0 ** min(failing - 1, 16))
    return ceiling * rng.uniform(0.5, 1.0)


@dataclass
class TaskState:
    name: str
    state: str = "running"  # running | retrying | done | failed (one-shot)
    failures: int = 0  # in all
    failing: int = 0  # in a row, since the task last reported ok
    last_error: str = ""
    last_failed_at: float | None = None
    retry_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "failures": self.failures,
            "failing": self.failing,
            "last_error": self.last_error,
            "last_failed_at": self.last_failed_at,
            "retry_in_s": None if self.retry_at is None else round(max(0.0, self.retry_at - time.time()), 1),
        }


class Supervisor:
    def __init__(
        self,
        stop: asyncio.Event,
        *,
        unready_after: int = 3,
        base_s: float = 1.0,
        cap_s: float = 30.0,
        on_failure: Callable[[str, str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.stop_event = stop
        self.unready_after = unready_after
        self.base_s, self.cap_s = base_s, cap_s
        self.on_failure = on_failure
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self.states: dict[str, TaskState] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, name: str, factory: Factory, *, cap_s: float | None = None) -> None:
        """Run `factory()` until the stop event, restarting it after each failure."""
        self.states[name] = TaskState(name)
        self._hold(asyncio.create_task(self._supervise(name, factory, cap_s or self.cap_s), name=name))

    def once(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` once, held until done; a failure is logged and recorded, not retried."""
        self.states[name] = state = TaskState(name)

        async def run() -> None:
            try:
                await coro
                state.state = "done"
            except Exception as exc:  # recorded: nothing may vanish
                state.state = "failed"
                self._record(state, exc)

        self._hold(asyncio.create_task(run(), name=name))

    def ok(self, name: str) -> None:
        """The task did its job once: it is healthy again."""
        state = self.states.get(name)
        if state is not None and state.failing:
            log.info("task.recovered", task=name, after_failures=state.failing)
            state.failing, state.state, state.retry_at = 0, "running", None

    def not_ready(self) -> list[str]:
        return [
            f"task {s.name}: failed {s.failing} times in a row, last: {s.last_error}"
            for s in self.states.values()
            if s.failing >= self.unready_after
        ]

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: s.to_dict() for name, s in self.states.items()}

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _hold(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _record(self, state: TaskState, exc: BaseException) -> None:
        state.failures += 1
        state.failing += 1
        state.last_error = describe(exc)
        state.last_failed_at = time.time()
        if self.on_failure is not None:
            self.on_failure(state.name, state.last_error)

    async def _supervise(self, name: str, factory: Factory, cap_s: float) -> None:
        state = self.states[name]
        while not self.stop_event.is_set():
            try:
                await factory()
                if self.stop_event.is_set():
                    break
                raise RuntimeError("the task returned while the agent runs")
            except Exception as exc:  # every failure is logged, shown and retried
                self._record(state, exc)
                delay = backoff_s(state.failing, self.base_s, cap_s, self.rng)
                state.state, state.retry_at = "retrying", time.time() + delay
                log.error(
                    "task.failed",
                    task=name,
                    error=state.last_error,
                    failing=state.failing,
                    retry_in_s=round(delay, 1),
                    not_ready=state.failing >= self.unready_after,
                )
                try:
                    await asyncio.wait_for(self.stop_event.wait(), delay)
                except TimeoutError:
                    state.state = "running"
                    continue
        state.state, state.retry_at = "done", None
