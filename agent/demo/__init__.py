"""`meshagent demo`: the whole story on one machine, in network namespaces."""
