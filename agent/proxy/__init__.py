"""The data plane: inbound and outbound mTLS proxying of intercepted connections.

Sans-IO pieces (detect, policy, catalog) decide; `relay.py` moves bytes; `listeners.py` is the
one asyncio shell that accepts connections and wires the two together.
"""
