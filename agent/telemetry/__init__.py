"""The metrics plane: linkerd-compatible metric families, process metrics, the admin server."""
