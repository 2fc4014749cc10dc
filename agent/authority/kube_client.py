"""The controller's Kubernetes API client: objects as dicts, one request per call (issue #17).

The only module that imports lightkube (controller mode only: `authority serve` without
`--kubernetes` never loads it). lightkube does what is hard to get right alone: reading a
kubeconfig or the in-cluster service account, TLS to the API server, and every kind of user
credential (token, rotated token file, client certificate, exec plugin). It hands us an
authenticated httpx client; the requests themselves are written here, because what the
controller needs differs from lightkube 1.0.1's calls in three places (read in its source,
`core/async_client.py` and `core/generic_client.py`):

- its `delete()` sends no body, so no `DeleteOptions.preconditions` (uid, resourceVersion):
  a re-created object of the same name could be removed;
- its `watch()` answers a `410 Gone` by watching again from "now" (`reset_version`), which
  silently skips every change in between; the controller must re-list instead;
- it decodes objects into typed models, while the controller's objects are the plain dicts
  `kube_objects` builds and `kube_reconcile` compares (CRDs included): no model round trip
  that could drop or reorder a field.

Errors are values the operator can act on: a kubeconfig that cannot be read
(`KubeConfigError`), the API server unreachable (`KubeUnreachable`), and answers
(`KubeApiError` with the HTTP status): 401/403 name the RBAC verb and resource that is
missing, a 404 on a list names the CRD to install.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import yaml
from lightkube.config.client_adapter import AsyncClient as adapter_client
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import KubeConfig
from lightkube.core.exceptions import ConfigError as LightkubeConfigError

from agent.errors import MeshagentError

KubeObject = dict[str, Any]

RBAC_DOC = "the ClusterRole in docs/kubernetes.md (§2, RBAC)"
_REQUEST_TIMEOUT_S = 10.0


class KubeError(MeshagentError):
    code = "kube_error"


class KubeConfigError(KubeError):
    code = "kube_config_invalid"


class KubeUnreachable(KubeError):
    code = "kube_unreachable"


class KubeApiError(KubeError):
    """The API server answered with an error status (`status`, and its `reason` word)."""

    code = "kube_api_error"

    def __init__(self, message: str, hint: str, *, status: int, reason: str) -> None:
        super().__init__(message, hint)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Resource:
    """One API resource: where it lives and how the API server names it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    crd: str | None = None  # the CRD that defines it, for "install it" hints
    # Older versions read when `version` is not served (404): a CRD from before that version.
    fallback_versions: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """`plural.group` as RBAC rules and kubectl name it."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        parts = [base]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
        if sub is not None:
            parts.append(sub)
        return "/".join(parts)


SERVICE = Resource("", "v1", "services", "Service")
POD = Resource("", "v1", "pods", "Pod")
NAMESPACE = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
ENDPOINT_SLICE = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
LEASE = Resource("coordination.k8s.io", "v1", "leases", "Lease")
EXTERNAL_WORKLOAD = Resource(
    "workload.linkerd.io", "v1beta1", "externalworkloads", "ExternalWorkload",
    crd="externalworkloads.workload.linkerd.io (Linkerd's linkerd-crds chart, 2.15 or later)",
)  # fmt: skip
WORKLOAD_ENTRY = Resource(
    "networking.istio.io", "v1", "workloadentries", "WorkloadEntry",
    crd="workloadentries.networking.istio.io (Istio's base chart, 1.22 or later)",
)  # fmt: skip
# Policy (read only, the Lease holder): Linkerd's and SMI's objects as kube_policy reads them.
_LINKERD_CRDS = "Linkerd's linkerd-crds chart"
SERVER = Resource(
    "policy.linkerd.io", "v1beta3", "servers", "Server",
    crd=f"servers.policy.linkerd.io ({_LINKERD_CRDS}, a release serving v1beta3)",
)  # fmt: skip
AUTHORIZATION_POLICY = Resource(
    "policy.linkerd.io", "v1alpha1", "authorizationpolicies", "AuthorizationPolicy",
    crd=f"authorizationpolicies.policy.linkerd.io ({_LINKERD_CRDS})",
)  # fmt: skip
MESHTLS_AUTHENTICATION = Resource(
    "policy.linkerd.io", "v1alpha1", "meshtlsauthentications", "MeshTLSAuthentication",
    crd=f"meshtlsauthentications.policy.linkerd.io ({_LINKERD_CRDS})",
)  # fmt: skip
NETWORK_AUTHENTICATION = Resource(
    "policy.linkerd.io", "v1alpha1", "networkauthentications", "NetworkAuthentication",
    crd=f"networkauthentications.policy.linkerd.io ({_LINKERD_CRDS})",
)  # fmt: skip
TRAFFIC_TARGET = Resource(
    "access.smi-spec.io", "v1alpha3", "traffictargets", "TrafficTarget",
    crd="traffictargets.access.smi-spec.io (the SMI CRDs, access v1alpha3)",
)  # fmt: skip
TCP_ROUTE = Resource(
    "specs.smi-spec.io", "v1alpha4", "tcproutes", "TCPRoute",
    crd="tcproutes.specs.smi-spec.io (the SMI CRDs, specs v1alpha4)",
)  # fmt: skip
POLICY_RESOURCES = (
    SERVER, AUTHORIZATION_POLICY, MESHTLS_AUTHENTICATION, NETWORK_AUTHENTICATION, TRAFFIC_TARGET, TCP_ROUTE,
)  # fmt: skip
# Route CRDs (#21, `serve --routes-from-cluster`): read only, never their status.
HTTP_ROUTE = Resource(
    "gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute",
    crd="httproutes.gateway.networking.k8s.io (the Gateway API CRDs, standard channel, v1)",
    fallback_versions=("v1beta1",),  # Gateway API before v1.0 (Linkerd 2.14's bundled CRD)
)  # fmt: skip
LINKERD_HTTP_ROUTE = Resource(
    "policy.linkerd.io", "v1beta3", "httproutes", "HTTPRoute",
    crd=f"httproutes.policy.linkerd.io ({_LINKERD_CRDS}, a release serving v1beta3)",
)  # fmt: skip
TRAFFIC_SPLIT = Resource(
    "split.smi-spec.io", "v1alpha2", "trafficsplits", "TrafficSplit",
    crd="trafficsplits.split.smi-spec.io (the SMI CRDs, split v1alpha2; Linkerd's linkerd-smi extension)",
)  # fmt: skip
SERVICE_PROFILE = Resource(
    "linkerd.io", "v1alpha2", "serviceprofiles", "ServiceProfile",
    crd=f"serviceprofiles.linkerd.io ({_LINKERD_CRDS})",
)  # fmt: skip
ROUTE_RESOURCES = (HTTP_ROUTE, LINKERD_HTTP_ROUTE, TRAFFIC_SPLIT, SERVICE_PROFILE)
BY_KIND = {
    r.kind: r for r in (SERVICE, POD, NAMESPACE, ENDPOINT_SLICE, LEASE, EXTERNAL_WORKLOAD, WORKLOAD_ENTRY)
}


@dataclass(frozen=True)
class ObjectList:
    items: list[KubeObject]
    resource_version: str


@dataclass(frozen=True)
class WatchEvent:
    """ADDED, MODIFIED, DELETED or BOOKMARK, and the object (a bookmark's carries only its
    resourceVersion)."""

    type: str
    object: KubeObject


def load_config(kubeconfig: Path | None) -> Any:
    """The kubeconfig's current context, or the in-cluster service account when None."""
    try:
        if kubeconfig is None:
            return KubeConfig.from_service_account().get()
        return KubeConfig.from_file(kubeconfig).get()
    except KeyError as exc:  # from_service_account reads KUBERNETES_SERVICE_HOST/PORT
        raise KubeConfigError(
            f"not running in a pod: {exc.args[0]} is not set",
            "give --kubeconfig PATH outside a cluster",
        ) from None
    except (LightkubeConfigError, OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as exc:
        where = str(kubeconfig) if kubeconfig is not None else "the in-cluster service account"
        raise KubeConfigError(
            f"cannot read the Kubernetes client configuration from {where}: {exc}",
            "check the file (kubectl --kubeconfig PATH get ns), or run in a pod with a service account",
        ) from None


def _verb(method: str, name: str | None, watch: bool) -> str:
    if method == "GET":
        return "watch" if watch else ("get" if name is not None else "list")
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, method.lower()
    )


def _status_body(content: bytes) -> Mapping[str, Any]:
    try:
        doc = json.loads(content)
    except ValueError:
        return {}
    return doc if isinstance(doc, Mapping) else {}


def api_error(
    status: int, body: Mapping[str, Any], *, method: str, res: Resource, name: str | None, sub: str | None,
    watch: bool = False,
) -> KubeApiError:  # fmt: skip
    """The API server's Status as an error naming what to do about it."""
    reason = str(body.get("reason") or "")
    message = str(body.get("message") or f"HTTP {status}")[:500]
    verb = _verb(method, name, watch)
    resource = res.qualified + (f"/{sub}" if sub else "")
    what = f"{verb} {resource}" + (f" {name}" if name else "")
    hint = ""
    if status == 401:
        hint = "the API server refused our credentials: renew the kubeconfig's token or client certificate"
    elif status == 403:
        hint = (
            f"the authority's service account may not {verb!r} {resource!r}: bind it to {RBAC_DOC}"
            f" (kubectl auth can-i {verb} {resource} --as=system:serviceaccount:NS:SA)"
        )
    elif status == 404 and name is None and method == "GET" and res.crd is not None:
        hint = f"the CRD is not installed: install {res.crd}"
    elif status == 404 and name is None and method == "GET":
        hint = (
            f"the API server does not serve {res.api_version} {res.plural}: is it Kubernetes 1.21 or later?"
        )
    elif status == 404 and method == "POST":
        hint = "create the namespace first (kubectl create namespace NS)"
    return KubeApiError(
        f"{what}: {status} {reason or 'error'}: {message}", hint, status=status, reason=reason
    )


def _transport_failure(url: str, exc: BaseException) -> BaseException:
    """What a transport error means: the API server is unreachable, unless our own task is
    being cancelled (the transport may surface a cancellation as a read error; turning it
    into a retryable error would swallow the cancel and hang the controller's shutdown)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return asyncio.CancelledError()
    return unreachable(url, exc)


def unreachable(url: str, exc: BaseException) -> KubeUnreachable:
    return KubeUnreachable(
        f"the Kubernetes API server at {url} is unreachable: {type(exc).__name__}: {exc}"[:600],
        "check the server address in the kubeconfig and the network to it; the last known "
        "state is kept and requests are retried",
    )


class KubeClient:
    """Dict-level requests to one API server. `connect()` reads the configuration."""

    def __init__(self, http: httpx2.AsyncClient, url: str, namespace: str = "default") -> None:
        self._http = http
        self.url = url
        self.namespace = namespace  # the kubeconfig context's, or the pod's own in a cluster

    @classmethod
    def connect(cls, kubeconfig: Path | None, *, timeout_s: float = _REQUEST_TIMEOUT_S) -> KubeClient:
        config = load_config(kubeconfig)
        # httpx logs every request at INFO: a Lease renewal every 2 s would flood the log.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        if config is None:
            raise KubeConfigError(
                f"the kubeconfig {kubeconfig} has no current context",
                "set one: kubectl config use-context NAME",
            )
        try:
            # trust_env=False: no HTTP(S)_PROXY detour for the API server unless the kubeconfig says so.
            params = ConnectionParams(timeout=httpx2.Timeout(timeout_s), trust_env=False)
            http = adapter_client(config, params)
        except (LightkubeConfigError, OSError, ValueError, AssertionError) as exc:
            raise KubeConfigError(
                f"cannot use the Kubernetes client configuration: {exc}",
                "check the kubeconfig's certificate and user entries",
            ) from None
        return cls(http, str(config.cluster.server), str(config.namespace or "default"))

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(
        self,
        method: str,
        res: Resource,
        *,
        namespace: str | None = None,
        name: str | None = None,
        sub: str | None = None,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> KubeObject:
        content = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type, "Accept": "application/json"} if content else None
        try:
            resp = await self._http.request(
                method,
                res.path(namespace, name, sub),
                params=dict(params or {}),
                content=content,
                headers=headers,
            )
        except httpx2.TransportError as exc:
            raise _transport_failure(self.url, exc) from None
        doc = _status_body(resp.content)
        if resp.status_code >= 400:
            raise api_error(resp.status_code, doc, method=method, res=res, name=name, sub=sub)
        return dict(doc)

    async def list(
        self, res: Resource, *, namespace: str | None = None, label_selector: str | None = None
    ) -> ObjectList:
        """Every object (all namespaces when `namespace` is None), following `continue`."""
        items: list[KubeObject] = []
        params: dict[str, str] = {"limit": "500"}
        if label_selector:
            params["labelSelector"] = label_selector
        while True:
            doc = await self._request("GET", res, namespace=namespace, params=params)
            for item in doc.get("items") or []:
                if isinstance(item, dict):
                    # Items of a list carry no apiVersion/kind; the reconciler keys on them.
                    item.setdefault("apiVersion", res.api_version)
                    item.setdefault("kind", res.kind)
                    items.append(item)
            meta = doc.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                return ObjectList(items, str(meta.get("resourceVersion") or ""))
            params["continue"] = str(cont)

    async def watch(
        self,
        res: Resource,
        *,
        resource_version: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        timeout_s: int = 300,
    ) -> AsyncIterator[WatchEvent]:
        """Events after `resource_version` until the server ends the watch (after about
        `timeout_s`). A 410 Gone (as a status or an ERROR event) raises KubeApiError(410):
        re-list; a broken connection raises KubeUnreachable: watch again from the last version."""
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        if label_selector:
            params["labelSelector"] = label_selector
        # No read timeout on a quiet watch; the server's timeoutSeconds (plus slack) bounds it.
        timeout = httpx2.Timeout(_REQUEST_TIMEOUT_S, read=timeout_s + 30.0)
        try:
            async with self._http.stream(
                "GET", res.path(namespace), params=params, timeout=timeout
            ) as resp:  # fmt: skip
                if resp.status_code >= 400:
                    body = _status_body(await resp.aread())
                    raise api_error(
                        resp.status_code, body, method="GET", res=res, name=None, sub=None, watch=True
                    )
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    yield _event(line, res)
        except httpx2.TransportError as exc:
            raise _transport_failure(self.url, exc) from None

    async def get(self, res: Resource, namespace: str, name: str) -> KubeObject | None:
        """The object, or None if it does not exist."""
        try:
            obj = await self._request("GET", res, namespace=namespace, name=name)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    async def create(self, res: Resource, obj: Mapping[str, Any], *, field_manager: str) -> KubeObject:
        meta = obj.get("metadata") or {}
        return await self._request(
            "POST", res, namespace=meta.get("namespace"), body=obj, params={"fieldManager": field_manager}
        )

    async def replace(self, res: Resource, obj: Mapping[str, Any], *, field_manager: str) -> KubeObject:
        """PUT: the body's metadata.resourceVersion makes a stale write a 409."""
        meta = obj.get("metadata") or {}
        return await self._request(
            "PUT", res, namespace=meta.get("namespace"), name=str(meta.get("name")), body=obj,
            params={"fieldManager": field_manager},
        )  # fmt: skip

    async def patch_status(
        self, res: Resource, namespace: str, name: str, patch: Mapping[str, Any], *, field_manager: str
    ) -> KubeObject:
        """JSON merge patch of `/status` (a resourceVersion in the patch's metadata is a precondition)."""
        return await self._request(
            "PATCH", res, namespace=namespace, name=name, sub="status", body=patch,
            params={"fieldManager": field_manager}, content_type="application/merge-patch+json",
        )  # fmt: skip

    async def delete(
        self, res: Resource, namespace: str, name: str, *, uid: str, resource_version: str
    ) -> None:
        """DELETE with preconditions: a 409 if the object was re-created or changed since read."""
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"uid": uid, "resourceVersion": resource_version},
        }
        await self._request("DELETE", res, namespace=namespace, name=name, body=options)


def _event(line: str, res: Resource) -> WatchEvent:
    try:
        doc = json.loads(line)
    except ValueError:
        raise KubeApiError(
            f"watch {res.qualified}: a line that is not JSON", "", status=0, reason="Malformed"
        ) from None
    kind, obj = (doc.get("type"), doc.get("object")) if isinstance(doc, dict) else (None, None)
    if not isinstance(kind, str) or not isinstance(obj, dict):
        raise KubeApiError(
            f"watch {res.qualified}: an event without type or object", "", status=0, reason="Malformed"
        )
    if kind == "ERROR":
        code = obj.get("code")
        status = code if isinstance(code, int) else 500
        raise api_error(status, obj, method="GET", res=res, name=None, sub=None, watch=True)
    obj.setdefault("apiVersion", res.api_version)
    obj.setdefault("kind", res.kind)
    return WatchEvent(kind, obj)
