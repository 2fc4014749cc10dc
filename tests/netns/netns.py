"""The namespace lab lives in `agent.netlab` (the demo uses it too); tests import it from here
as well as from there."""

from agent.netlab import Host, Lab, namespaces, netns_supported, remove_by_prefix

__all__ = ["Host", "Lab", "namespaces", "netns_supported", "remove_by_prefix"]
