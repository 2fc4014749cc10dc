"""meshagent: brings legacy hosts into a Kubernetes service mesh's identity, mTLS and metrics planes."""

__version__ = "0.1.0"
