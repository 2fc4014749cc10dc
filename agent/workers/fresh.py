"""A replacement worker in a new interpreter (agent/workers/forker.fresh_argv starts `run`).

The supervisor (agent/workers/forker.Spawner) starts it with its slot's listening sockets and its
end of the control channel inherited, and writes to SPEC_FD the pickled `(main, slot, layout,
control_fd)`: `layout` names the inherited listening fds by direction. It then runs `main`
exactly as a worker forked at start does (`worker.main`: it waits for `init`, never returns).
`python -m agent.workers.fresh SPEC_FD` runs it too.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
from typing import NoReturn


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _adopt(fd: int) -> socket.socket:
    """An inherited socket, made close-on-exec again (pass_fds cleared it): as in a worker
    forked at start, a process this worker ever runs gets none of its sockets."""
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    return sock


def run(spec_fd: int) -> NoReturn:
    code = 1
    try:
        main, slot, layout, control = pickle.loads(_read_all(spec_fd))  # noqa: S301 - our supervisor's
        sockets = {name: [_adopt(fd) for fd in fds] for name, fds in layout.items()}
        main(slot, sockets, _adopt(control))
    except BaseException:  # main never returns; this is a start that failed
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


if __name__ == "__main__":
    run(int(sys.argv[1]))
