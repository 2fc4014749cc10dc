"""A callback for the Ansible VM suite only: how long each task took on each host.

Enabled by the test (ANSIBLE_CALLBACK_PLUGINS=tests/vm/callback_plugins,
ANSIBLE_CALLBACKS_ENABLED=task_timer); appends one JSON line per task and host to the file
named by MESHAGENT_ANSIBLE_TIMES: {"play", "task", "host", "status", "start", "s"}.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ansible.plugins.callback import CallbackBase  # type: ignore[import-untyped]


class CallbackModule(CallbackBase):  # type: ignore[misc]
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "task_timer"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._path = os.environ.get("MESHAGENT_ANSIBLE_TIMES", "")
        self._play = ""
        self._started: dict[tuple[str, str], float] = {}

    def v2_playbook_on_play_start(self, play: Any) -> None:
        self._play = play.get_name()

    def v2_runner_on_start(self, host: Any, task: Any) -> None:
        self._started[(host.get_name(), task._uuid)] = time.time()

    def _done(self, result: Any, status: str) -> None:
        host, task = result._host.get_name(), result._task
        start = self._started.pop((host, task._uuid), None)
        if start is None or not self._path:
            return
        line = {
            "play": self._play,
            "task": task.get_name(),
            "host": host,
            "status": status,
            "start": round(start, 3),
            "s": round(time.time() - start, 3),
        }
        with open(self._path, "a") as out:
            out.write(json.dumps(line) + "\n")

    def v2_runner_on_ok(self, result: Any) -> None:
        self._done(result, "changed" if result._result.get("changed") else "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._done(result, "failed")

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._done(result, "skipped")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._done(result, "unreachable")
