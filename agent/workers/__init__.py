"""Proxy workers, one per core (issue #19): the supervisor keeps the state and the listening
sockets and forks the first workers at start; each worker runs the data plane on its slot's
sockets.

- forker.py: `bind_listeners` (SO_REUSEPORT sockets per slot), `fork_workers` / `Spawner`
  (the first workers forked at start, replacements started as new interpreters, exits reaped).
- fresh.py: a replacement's entry point (a new interpreter, started by `Spawner`).
- control.py: `Channel`, the framed request/notify channel to each worker.
- worker.py: `main`, a worker's life.
- pool.py: `WorkerPool`, the supervisor's side (the Proxy surface the daemon uses).
- cpus.py: `auto_workers`, the CPUs the agent may use (affinity, cgroup CPU quota).
"""
