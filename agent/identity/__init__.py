"""The identity plane on the host: names, keys and CSRs, the on-disk store, rotation."""
