"""What discovered Services cost per refresh, at the size issue #17 names (5,000 endpoints).

    python -m bench.discovery [--services 50] [--endpoints 100] [--json]

The authority side (objects -> the hosts' `services`, the document serialized and hashed for
its ETag) and the host side (the document parsed, merged into the directory, the DNS name table
built), each timed as the median of several runs on this machine. There is no haproxy
equivalent to compare with: these are the absolute costs of one change reaching one host; the
document is sent whole on every change (no deltas), so its size is the bytes per host per change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from agent.authority.kube_discovery import build_services
from agent.dns.names import build_table
from agent.proxy.directory import merge
from agent.proxy.policy import DefaultPolicy, InboundPolicy, PortPolicy

TD = "cluster.local"


def cluster(services: int, per_service: int) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """Services of `per_service` meshed pods each, one EndpointSlice of up to 100 per slice."""
    svcs, slices, pods = [], [], []
    for s in range(services):
        name = f"svc-{s}"
        svcs.append(
            {
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": f"198.19.{s // 256}.{s % 256}",
                    "clusterIPs": [f"198.19.{s // 256}.{s % 256}"],
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                },
            }
        )
        for first in range(0, per_service, 100):
            endpoints = []
            for e in range(first, min(first + 100, per_service)):
                pod = f"{name}-{e}"
                n = s * per_service + e
                endpoints.append(
                    {
                        "addresses": [f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"],
                        "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"},
                    }
                )
                pods.append(
                    {
                        "metadata": {
                            "name": pod,
                            "namespace": "shop",
                            "labels": {"linkerd.io/control-plane-ns": "linkerd"},
                        },
                        "spec": {"serviceAccountName": name, "containers": [{"name": "app"}]},
                    }
                )
            slices.append(
                {
                    "metadata": {
                        "name": f"{name}-{first}",
                        "namespace": "shop",
                        "labels": {"kubernetes.io/service-name": name},
                    },
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": endpoints,
                }
            )
    namespaces = [{"metadata": {"name": "shop"}}]
    return svcs, slices, pods, namespaces


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def median_ms(fn: Callable[[], object], runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 2)


def measure(services: int, per_service: int) -> dict[str, Any]:
    svcs, slices, pods, namespaces = cluster(services, per_service)
    discovered = build_services(svcs, slices, pods, namespaces, [], TD).services
    doc = {"catalog": [], "policy": {"ports": {}}, "services": discovered}
    body = canonical(doc)
    policy = InboundPolicy(PortPolicy(DefaultPolicy("all-unauthenticated")), {})
    directory = merge([], policy, json.loads(body))
    assert len(directory.services) > 0 and not directory.rejected
    return {
        "services": services,
        "endpoints": services * per_service,
        "document_bytes": len(body),
        "authority_build_services_ms": median_ms(
            lambda: build_services(svcs, slices, pods, namespaces, [], TD), runs=3
        ),
        "authority_serialize_and_hash_ms": median_ms(lambda: hashlib.sha256(canonical(doc)).hexdigest()),
        "host_parse_json_ms": median_ms(lambda: json.loads(body)),
        "host_merge_directory_ms": median_ms(lambda: merge([], policy, json.loads(body))),
        "host_dns_table_ms": median_ms(
            lambda: build_table(directory.services.addresses(), (b"cluster", b"local"), short_forms=False)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--endpoints", type=int, default=100, help="per Service")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.services, args.endpoints)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:36} {value}")


if __name__ == "__main__":
    main()
