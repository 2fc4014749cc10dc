"""The Kubernetes objects for a host (agent/authority/kube_objects.py), checked against the
published CRD schemas (tests/authority/schemas/, each naming the upstream file and commit) and
against the rules of the programs that read them (Linkerd's destination controller, Istio's
pilot, the API server's name and label validation)."""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.authority import kube_objects as ko
from agent.authority.kube_objects import Health, HostWorkload, KubeObjectError, WorkloadPort
from agent.errors import MeshagentError
from agent.identity.names import WorkloadIdentity

SCHEMAS = Path(__file__).parent / "schemas"
AUTH = "default"
T0 = datetime(2026, 12, 6, 9, 30, 15, 123456, tzinfo=UTC)
BILLING = WorkloadIdentity("cluster.local", "shop", "billing")


def _schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


def _strict(schema: Any) -> Any:
    """The CRD schema as the API server applies it, made to fail where it would silently prune:
    an object schema with `properties` keeps only those (structural schema pruning), so an
    unknown field is an error here instead of a field that vanishes on apply."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    # RFC 3339 as metav1.Time writes it (jsonschema checks date-time only with an extra package).
    if not isinstance(value, str) or not re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value
    ):
        return False
    datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


@_FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


def _validator(name: str) -> jsonschema.Draft7Validator:
    schema = _strict(_schema(name)["openAPIV3Schema"])
    # The API server always allows these at the root, whether the schema lists them or not
    # (Istio's generated CRDs list only spec and status).
    implicit = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
    schema["properties"] = {**implicit, **schema["properties"]}
    return jsonschema.Draft7Validator(schema, format_checker=_FORMATS)


LINKERD = _validator("linkerd-externalworkload-v1beta1.json")
ISTIO = _validator("istio-workloadentry-v1.json")


def _istio_cel(obj: dict[str, Any]) -> None:
    """The x-kubernetes-validations (CEL) rules of the WorkloadEntry CRD, written out: a JSON
    Schema validator does not run CEL."""
    spec = obj["spec"]
    assert "address" in spec or "network" in spec, "Address is required"
    address = spec.get("address", "")
    if address.startswith("unix://"):
        assert "ports" not in spec, "UDS may not include ports"
    for key, port in spec.get("ports", {}).items():
        assert len(key) < 63 and re.fullmatch(r"[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?", key), key
        assert 0 < port <= 65535


def _meta_ok(obj: dict[str, Any]) -> None:
    """ObjectMeta as the API server validates it (metadata is `type: object` in the CRDs)."""
    meta = obj["metadata"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]) and len(meta["name"]) <= 63
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["namespace"])
    for key, value in meta.get("labels", {}).items():
        ko.validate_label_key(key)
        ko.validate_label_value(value)
    for key in meta.get("annotations", {}):
        ko.validate_label_key(key)


def _host(
    addresses: tuple[str, ...] = ("10.0.0.5",),
    *,
    host_id: str = "h-0123456789ab",
    host_name: str = "legacy-db-1",
    ready: bool = True,
    labels: dict[str, str] | None = None,
    ports: tuple[WorkloadPort, ...] = (WorkloadPort("http", 8080), WorkloadPort("grpc", 9090)),
    inbound: int = 4143,
    message: str = "",
) -> HostWorkload:
    reason = ko.REASON_AGENT_READY if ready else ko.REASON_PROBE_FAILED
    return HostWorkload(
        host_id=host_id,
        host_name=host_name,
        identity=BILLING,
        addresses=addresses,
        ports=ports,
        health=Health(ready, reason, message, T0),
        labels=tuple((labels if labels is not None else {"app": "billing"}).items()),
        inbound_proxy_port=inbound,
    )


HOSTS = {
    "ipv4": _host(("10.0.0.5",)),
    "ipv6": _host(("2001:db8::5",)),
    "dual": _host(("10.0.0.5", "2001:db8::5")),
    "many": _host(("2001:db8::5", "10.0.0.5", "10.0.0.6", "2001:db8::6")),
    "not-ready": _host(ready=False, message="http probe on :8080 /healthz: status 503, expected 200"),
    "no-labels-no-ports": _host(labels={}, ports=()),
    "fqdn-host": _host(host_name="DB01.corp.example.com", labels={"example.com/tier": "db", "app": "x_y.z"}),
    "other-inbound": _host(inbound=14143),
    "udp": _host(ports=(WorkloadPort("dns", 53, "UDP"), WorkloadPort("dns-tcp", 53))),
}


# --- the CRD schemas -------------------------------------------------------------------------


@pytest.mark.parametrize("case", HOSTS)
def test_external_workload_validates_against_linkerds_crd(case: str) -> None:
    obj = ko.external_workload(HOSTS[case], AUTH)
    LINKERD.validate(obj)
    _meta_ok(obj)


@pytest.mark.parametrize("case", HOSTS)
def test_workload_entry_validates_against_istios_crd(case: str) -> None:
    obj = ko.workload_entry(HOSTS[case], AUTH)
    ISTIO.validate(obj)
    _istio_cel(obj)
    _meta_ok(obj)


def test_the_strict_schemas_catch_what_the_api_server_would_drop_or_refuse() -> None:
    """The checks above can fail: a misspelt field (pruned on apply), a third address, a bad
    condition status, a bad reason, a date without zone are each caught."""
    good = ko.external_workload(HOSTS["dual"], AUTH)
    mutations = {
        "misspelt meshTls": lambda o: o["spec"].__setitem__("meshTls", o["spec"].pop("meshTLS")),
        "unknown port field": lambda o: o["spec"]["ports"][0].__setitem__("targetPort", 1),
        "three ips": lambda o: o["spec"]["workloadIPs"].append({"ip": "10.0.0.9"}),
        "status yes": lambda o: o["status"]["conditions"][0].__setitem__("status", "yes"),
        "reason with space": lambda o: o["status"]["conditions"][0].__setitem__("reason", "Probe Failed"),
        "naive time": lambda o: o["status"]["conditions"][0].__setitem__(
            "lastTransitionTime", "2026-12-06 09:30"
        ),
        "port 0": lambda o: o["spec"]["ports"][0].__setitem__("port", 0),
        "empty identity": lambda o: o["spec"]["meshTLS"].__setitem__("identity", ""),
    }
    for what, mutate in mutations.items():
        bad = copy.deepcopy(good)
        mutate(bad)
        assert list(LINKERD.iter_errors(bad)), what
    entry = ko.workload_entry(HOSTS["dual"], AUTH)
    bad = copy.deepcopy(entry)
    bad["spec"]["serviceAcount"] = "x"
    assert list(ISTIO.iter_errors(bad))


def test_the_schema_files_name_their_source() -> None:
    for name, repo in (
        ("linkerd-externalworkload-v1beta1.json", "linkerd/linkerd2"),
        ("istio-workloadentry-v1.json", "istio/istio"),
    ):
        source = _schema(name)["source"]
        assert source["repository"] == repo
        assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
        assert source["storage"] is True  # the version the API server stores
        assert source["subresources"] == {"status": {}}  # why status is patched on its own


# --- what Linkerd and Istio read -------------------------------------------------------------


def test_external_workload_carries_what_linkerds_destination_controller_reads() -> None:
    obj = ko.external_workload(HOSTS["dual"], AUTH)
    spec = obj["spec"]
    assert obj["apiVersion"] == "workload.linkerd.io/v1beta1"
    assert obj["kind"] == "ExternalWorkload"
    assert obj["metadata"]["namespace"] == "shop"  # Services select workloads in their own namespace
    # identity parsed as a URI by the client proxy; a DNS form would mean no TLS at all
    assert spec["meshTLS"] == {
        "identity": "spiffe://cluster.local/ns/shop/sa/billing",
        "serverName": "billing.shop.serviceaccount.identity.linkerd.cluster.local",
    }
    assert spec["workloadIPs"] == [{"ip": "10.0.0.5"}, {"ip": "2001:db8::5"}]
    # getInboundPortFromExternalWorkload: the port named linkerd-proxy, else 4143
    assert spec["ports"] == [
        {"name": "http", "port": 8080, "protocol": "TCP"},
        {"name": "grpc", "port": 9090, "protocol": "TCP"},
        {"name": "linkerd-proxy", "port": 4143, "protocol": "TCP"},
    ]
    proxy = [
        p
        for p in ko.external_workload(HOSTS["other-inbound"], AUTH)["spec"]["ports"]
        if p["name"] == "linkerd-proxy"
    ]
    assert proxy == [{"name": "linkerd-proxy", "port": 14143, "protocol": "TCP"}]
    assert obj["metadata"]["labels"]["app"] == "billing"


def _is_ew_ready(obj: dict[str, Any]) -> bool:
    """linkerd2 external-workload/controller_util.go IsEwReady, written out."""
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in obj.get("status", {}).get("conditions", [])
    )


@pytest.mark.parametrize(
    ("ready", "status", "reason"), [(True, "True", "AgentReady"), (False, "False", "ProbeFailed")]
)
def test_ready_condition(ready: bool, status: str, reason: str) -> None:
    host = _host(ready=ready, message="" if ready else "tcp probe on :8080: connection refused")
    ew = ko.external_workload(host, AUTH)
    (cond,) = ew["status"]["conditions"]
    assert cond["type"] == "Ready" and cond["status"] == status and cond["reason"] == reason
    assert cond["lastTransitionTime"] == "2026-12-06T09:30:15Z"  # UTC, whole seconds
    assert ("message" in cond) == (not ready)
    assert _is_ew_ready(ew) == ready
    (healthy,) = ko.workload_entry(host, AUTH)["status"]["conditions"]
    assert healthy["type"] == "Healthy" and healthy["status"] == status


def test_transition_time_is_written_in_utc() -> None:
    since = datetime(2026, 12, 6, 11, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    host = HostWorkload("h-1", "a", BILLING, ("10.0.0.5",), (), Health(True, "AgentReady", "", since))
    assert (
        ko.external_workload(host, AUTH)["status"]["conditions"][0]["lastTransitionTime"]
        == "2026-12-06T09:00:00Z"
    )


def test_workload_entry_carries_what_istio_reads() -> None:
    obj = ko.workload_entry(HOSTS["many"], AUTH)
    assert obj["apiVersion"] == "networking.istio.io/v1" and obj["kind"] == "WorkloadEntry"
    assert obj["metadata"]["namespace"] == "shop"  # Istio's SPIFFE ID: this namespace + serviceAccount
    assert obj["spec"] == {
        "address": "2001:db8::5",  # the host's first address: an entry has one
        "labels": {"app": "billing"},
        "serviceAccount": "billing",  # set: Istio expects mTLS (getTLSModeFromWorkloadEntry)
        "ports": {"http": 8080, "grpc": 9090},  # the app's ports only, by Service port name
    }
    # without it Istio ignores the Healthy condition (conversion.go isHealthy)
    assert obj["metadata"]["annotations"]["proxy.istio.io/health-checks-enabled"] == "true"
    assert "ports" not in ko.workload_entry(HOSTS["no-labels-no-ports"], AUTH)["spec"]


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        (("10.0.0.5",), ["10.0.0.5"]),
        (("2001:db8::5",), ["2001:db8::5"]),
        (("10.0.0.5", "10.0.0.6"), ["10.0.0.5"]),
        (("2001:db8::5", "10.0.0.5"), ["2001:db8::5", "10.0.0.5"]),
        (("10.0.0.5", "10.0.0.6", "2001:db8::6", "2001:db8::7"), ["10.0.0.5", "2001:db8::6"]),
        (("2001:db8::5", "2001:db8::6", "192.0.2.1"), ["2001:db8::5", "192.0.2.1"]),
    ],
)
def test_workload_ips_one_per_family_in_host_order(addresses: tuple[str, ...], expected: list[str]) -> None:
    assert ko.workload_ips(addresses) == expected
    host = _host(addresses)
    assert [w["ip"] for w in ko.external_workload(host, AUTH)["spec"]["workloadIPs"]] == expected


def test_addresses_are_canonical_and_deduplicated() -> None:
    host = _host(("2001:DB8:0::5", "10.0.0.5", "2001:db8::5"))
    assert host.addresses == ("2001:db8::5", "10.0.0.5")


# --- names ------------------------------------------------------------------------------------

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@pytest.mark.parametrize(
    ("host_name", "prefix"),
    [
        ("legacy-db-1", "legacy-db-1-"),
        ("DB01.corp.example.com", "db01-corp-example-com-"),
        ("a", "a-"),
        ("x" * 63 + "." + "y" * 63, "x" * 52 + "-"),
        ("9host", "9host-"),
    ],
)
def test_object_names_are_dns1123_labels(host_name: str, prefix: str) -> None:
    name = ko.object_name(_host(host_name=host_name))
    assert name.startswith(prefix)
    assert _NAME.fullmatch(name) and len(name) <= 63


def test_object_names_are_stable_and_distinct() -> None:
    a = ko.object_name(_host())
    assert a == ko.object_name(_host(("10.9.9.9",), ready=False, labels={"app": "other"}, ports=()))
    assert a != ko.object_name(_host(host_id="h-0123456789ac"))  # same host name, another host
    assert a == "legacy-db-1-" + hashlib.sha256(b"h-0123456789ab").hexdigest()[:10]


@given(
    st.text(alphabet="abcXYZ019.-", min_size=1, max_size=253),
    st.from_regex(r"h-[0-9a-f]{12}", fullmatch=True),
)
@settings(max_examples=300, deadline=None)
def test_any_valid_host_name_gives_a_valid_name(host_name: str, host_id: str) -> None:
    try:
        host = _host(host_name=host_name, host_id=host_id)
    except MeshagentError:  # not a valid RFC 1123 host name: refused at the record
        return
    name = ko.object_name(host)
    assert _NAME.fullmatch(name) and len(name) <= 63


# --- labels and ownership ---------------------------------------------------------------------


def test_every_object_is_marked_as_the_authoritys() -> None:
    for obj in (ko.external_workload(HOSTS["ipv4"], AUTH), ko.workload_entry(HOSTS["ipv4"], AUTH)):
        labels = obj["metadata"]["labels"]
        assert labels == {
            "app": "billing",
            "app.kubernetes.io/managed-by": "meshagent",
            "meshagent.io/authority": "default",
            "meshagent.io/host-id": "h-0123456789ab",
        }
        assert obj["metadata"]["annotations"]["meshagent.io/host-name"] == "legacy-db-1"
        assert ko.is_owned(obj, "default")
        assert not ko.is_owned(obj, "staging")  # another authority's objects are not ours
    assert (
        ko.owner_selector("default")
        == "app.kubernetes.io/managed-by=meshagent,meshagent.io/authority=default"
    )


@pytest.mark.parametrize(
    "obj",
    [
        {"metadata": {"name": "x"}},
        {"metadata": {"labels": None}},
        {"metadata": {"labels": {"app.kubernetes.io/managed-by": "meshagent"}}},
        {
            "metadata": {
                "labels": {"app.kubernetes.io/managed-by": "Helm", "meshagent.io/authority": "default"}
            }
        },
        {},
    ],
)
def test_objects_made_by_others_are_not_owned(obj: dict[str, Any]) -> None:
    assert not ko.is_owned(obj, "default")


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        ({"app.kubernetes.io/managed-by": "me"}, "meshagent's own"),
        ({"meshagent.io/host-id": "h-1"}, "meshagent's own"),
        ({"meshagent.io/anything": "x"}, "meshagent's own"),
        ({"": "x"}, "label key"),
        ({"-app": "x"}, "label key"),
        ({"Example.com/app": "x"}, "label key"),
        ({"a/b/c": "x"}, "label key"),
        ({"k" * 64: "x"}, "label key"),
        ({"app": "has space"}, "label value"),
        ({"app": "v" * 64}, "label value"),
        ({"app": "-x"}, "label value"),
        ({f"k{i}": "v" for i in range(65)}, "at most 64"),
    ],
)
def test_bad_labels_are_refused(labels: dict[str, str], fragment: str) -> None:
    with pytest.raises(KubeObjectError, match=re.escape(fragment)):
        _host(labels=labels)


def test_labels_kept_sorted_and_empty_values_allowed() -> None:
    host = _host(labels={"tier": "", "app": "billing", "example.com/x": "Y.z_1"})
    assert host.labels == (("app", "billing"), ("example.com/x", "Y.z_1"), ("tier", ""))


# --- ports and records ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ports", "inbound", "fragment"),
    [
        ((WorkloadPort("linkerd-proxy", 5000),), 4143, "is the proxy's"),
        ((WorkloadPort("http", 4143),), 4143, "is the proxy's"),
        ((WorkloadPort("http", 80), WorkloadPort("http", 81)), 4143, "given twice"),
        ((WorkloadPort("a", 80), WorkloadPort("b", 80)), 4143, "given twice"),
        ((), 0, "inbound proxy port"),
        ((), 65536, "inbound proxy port"),
    ],
)
def test_bad_port_sets_are_refused(ports: tuple[WorkloadPort, ...], inbound: int, fragment: str) -> None:
    with pytest.raises(KubeObjectError, match=re.escape(fragment)):
        _host(ports=ports, inbound=inbound)


@pytest.mark.parametrize(
    ("name", "port", "protocol"),
    [
        ("HTTP", 80, "TCP"),
        ("http-server-long1", 80, "TCP"),  # 17 > 15
        ("80", 80, "TCP"),  # no letter
        ("a--b", 80, "TCP"),
        ("-a", 80, "TCP"),
        ("http", 0, "TCP"),
        ("http", 70000, "TCP"),
        ("http", True, "TCP"),
        ("sctp", 80, "SCTP"),
        ("tcp", 80, "tcp"),
    ],
)
def test_bad_ports_are_refused(name: str, port: int, protocol: str) -> None:
    with pytest.raises(KubeObjectError):
        WorkloadPort(name, port, protocol)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"addresses": ()},
        {"addresses": ("127.0.0.1",)},
        {"addresses": ("10.0.0.0/24",)},
        {"host_id": "H-1"},
        {"host_name": "bad_name"},
    ],
)
def test_bad_records_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(MeshagentError):  # KubeObjectError, or InvalidName from agent/identity/names.py
        _host(**kwargs)


@pytest.mark.parametrize(
    ("reason", "message", "since"),
    [
        ("Probe Failed", "", T0),
        ("", "", T0),
        ("1Bad", "", T0),
        ("Ok", "m" * 32769, T0),
        ("Ok", "", T0.replace(tzinfo=None)),
    ],
)
def test_bad_health_is_refused(reason: str, message: str, since: datetime) -> None:
    with pytest.raises(KubeObjectError):
        Health(False, reason, message, since)


# --- Service ----------------------------------------------------------------------------------


def _find_workload_port(ew: dict[str, Any], svc_port: dict[str, Any]) -> int | None:
    """linkerd2 endpoints_reconciler.go findWorkloadPort, written out: a named targetPort must
    match a workload port by name AND protocol."""
    for p in ew["spec"]["ports"]:
        if p["name"] == svc_port["targetPort"] and p.get("protocol", "TCP") == svc_port["protocol"]:
            return int(p["port"])
    return None


def test_service_selects_the_hosts_and_resolves_on_both_meshes() -> None:
    host = HOSTS["udp"]
    svc = ko.service("billing", "shop", {"app": "billing"}, host.ports, AUTH)
    assert svc["metadata"] == {
        "name": "billing",
        "namespace": "shop",
        "labels": {"app.kubernetes.io/managed-by": "meshagent", "meshagent.io/authority": "default"},
    }
    assert svc["spec"]["selector"] == {"app": "billing"}
    assert ko.is_owned(svc, AUTH)
    ew = ko.external_workload(host, AUTH)
    entry = ko.workload_entry(host, AUTH)
    # the selector matches the workloads' labels
    assert all(ew["metadata"]["labels"][k] == v for k, v in svc["spec"]["selector"].items())
    for port in svc["spec"]["ports"]:
        assert _find_workload_port(ew, port) == port["port"]
        assert entry["spec"]["ports"][port["name"]] == port["port"]  # Istio: by Service port name
    # 53/UDP and 53/TCP are two ports; Linkerd tells them apart by protocol
    assert [(p["name"], p["port"], p["protocol"]) for p in svc["spec"]["ports"]] == [
        ("dns", 53, "UDP"),
        ("dns-tcp", 53, "TCP"),
    ]


@pytest.mark.parametrize(
    ("name", "namespace", "selector", "ports"),
    [
        ("9billing", "shop", {"app": "b"}, (WorkloadPort("http", 80),)),  # DNS-1035: letter first
        ("Billing", "shop", {"app": "b"}, (WorkloadPort("http", 80),)),
        ("b" * 64, "shop", {"app": "b"}, (WorkloadPort("http", 80),)),
        ("billing", "Shop", {"app": "b"}, (WorkloadPort("http", 80),)),
        ("billing", "shop", {}, (WorkloadPort("http", 80),)),
        ("billing", "shop", {"app": "b"}, ()),
        ("billing", "shop", {"app": "b"}, (WorkloadPort("http", 80), WorkloadPort("http", 81))),
        ("billing", "shop", {"app": "bad value"}, (WorkloadPort("http", 80),)),
    ],
)
def test_bad_services_are_refused(
    name: str, namespace: str, selector: dict[str, str], ports: tuple[WorkloadPort, ...]
) -> None:
    with pytest.raises(KubeObjectError):
        ko.service(name, namespace, selector, ports, AUTH)


# --- status, YAML -----------------------------------------------------------------------------


def test_status_goes_to_its_subresource_apart() -> None:
    obj = ko.external_workload(HOSTS["not-ready"], AUTH)
    main = ko.without_status(obj)
    assert "status" not in main and main["spec"] == obj["spec"]
    patch = ko.status_patch(obj)
    assert patch == {
        "apiVersion": obj["apiVersion"],
        "kind": "ExternalWorkload",
        "metadata": {"name": obj["metadata"]["name"], "namespace": "shop"},
        "status": obj["status"],
    }
    LINKERD.validate({**patch, "spec": obj["spec"]})


def test_same_host_same_objects() -> None:
    """A reconciler compares desired with observed: an unchanged host must render identically."""
    a = ko.render_yaml([ko.external_workload(_host(), AUTH), ko.workload_entry(_host(), AUTH)])
    b = ko.render_yaml([ko.external_workload(_host(), AUTH), ko.workload_entry(_host(), AUTH)])
    assert a == b


def test_yaml_reads_back_as_the_objects() -> None:
    objects = [ko.external_workload(h, AUTH) for h in HOSTS.values()]
    objects += [ko.workload_entry(h, AUTH) for h in HOSTS.values()]
    objects.append(ko.service("billing", "shop", {"app": "billing"}, HOSTS["ipv4"].ports, AUTH))
    text = ko.render_yaml(objects)
    assert text.startswith("---\napiVersion: workload.linkerd.io/v1beta1\nkind: ExternalWorkload\n")
    assert list(yaml.safe_load_all(text)) == objects
    assert 'status: "True"' in text  # a word YAML 1.1 reads as a bool is quoted
    assert ko.render_yaml([]) == ""


def test_yaml_layout() -> None:
    text = ko.render_yaml([{"a": {"b": [1, {"c": "d", "e": []}], "f": {}}, "g": [[1, 2], "x"], "h": None}])
    assert text == (
        "---\na:\n  b:\n    - 1\n    - c: d\n      e: []\n  f: {}\ng:\n  - - 1\n    - 2\n  - x\nh: null\n"
    )
    assert yaml.safe_load(text) == {
        "a": {"b": [1, {"c": "d", "e": []}], "f": {}},
        "g": [[1, 2], "x"],
        "h": None,
    }


@pytest.mark.parametrize(
    "value",
    [
        "True",
        "no",
        "ON",
        "null",
        "~",
        "1",
        "0x10",
        "1e3",
        "2026-12-06",
        "a: b",
        "#x",
        "- x",
        "",
        " x",
        "*a",
        "&a",
        "!x",
        "{}",
        "[]",
        "'q'",
        '"q"',
        "a\nb",
        "tab\there",
        "\x7f\x85\u2028\ufeff",
        "é😀",
        "\ud800",
    ],
)
def test_strings_readers_could_misread_are_quoted(value: str) -> None:
    text = ko.render_yaml([{"k": value, value or "empty": 1}])
    assert list(yaml.safe_load_all(text)) == [{"k": value, value or "empty": 1}]


@given(
    st.dictionaries(st.text(max_size=20), st.text(max_size=40) | st.integers() | st.booleans(), max_size=5)
)
@settings(max_examples=400, deadline=None)
def test_any_json_shaped_object_round_trips(obj: dict[str, Any]) -> None:
    assert list(yaml.safe_load_all(ko.render_yaml([obj, {"list": list(obj.values())}]))) == [
        obj,
        {"list": list(obj.values())},
    ]


def test_yaml_12_reader_agrees() -> None:
    ruamel = pytest.importorskip("ruamel.yaml")
    objects = [ko.external_workload(HOSTS["not-ready"], AUTH), ko.workload_entry(HOSTS["dual"], AUTH)]
    loaded = list(ruamel.YAML(typ="safe", pure=True).load_all(ko.render_yaml(objects)))
    assert json.loads(json.dumps(loaded)) == objects


def test_unknown_flavor_is_refused() -> None:
    assert ko.host_object(HOSTS["ipv4"], "linkerd", AUTH)["kind"] == "ExternalWorkload"
    assert ko.host_object(HOSTS["ipv4"], "istio", AUTH)["kind"] == "WorkloadEntry"
    with pytest.raises(KubeObjectError, match="neither linkerd nor istio"):
        ko.host_object(HOSTS["ipv4"], "consul", AUTH)  # type: ignore[arg-type]


def test_ip_families_sanity() -> None:
    # the fixtures cover both families
    assert {ipaddress.ip_address(a).version for h in HOSTS.values() for a in h.addresses} == {4, 6}
