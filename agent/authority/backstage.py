"""The fleet as Backstage catalog entities: one `Component` per enrolled host (issue #20).

Pure functions: hosts (registry records), their metadata (host_meta.HostMeta) and the observed
traffic (edges.Edge) in; entity documents, their file names and a report out. The CLI
(agent/cli/authority_backstage.py) fetches the inputs and writes the files.

Backstage's rules, from backstage/backstage packages/catalog-model (schema/ and
validation/KubernetesValidatorFunctions.ts), which this module keeps:
- metadata.name: 1..63 characters, `[A-Za-z0-9]` runs separated by `-`, `_` or `.`; unique per
  kind and namespace, compared without case (the catalog lower-cases entity refs), so names
  here are lower case.
- entity refs `kind:namespace/name`: the owner is a Group, `group:default/<team>`; the system a
  System, `system:default/<system>`; dependsOn points at Components.
- annotation keys `[dns-subdomain/]name`, values strings; tags DNS labels.

Naming (see `component_names`): a host's component is named after its host name, sanitized
(lower case; any other character than `a-z 0-9 . _ -` becomes `-`; runs of separators become
one; no separator at either end; cut to 63). Hosts whose sanitized names collide: the one
enrolled first keeps the name (stable while new hosts join), the others get `-<host id hex>`
(6 hex digits, the full 12 if that is taken too). The original host name stays in
metadata.title and the `meshagent.io/host-name` annotation.

dependsOn (see `depends_on`): the edges out of the host (it is the client): requests, or
connections for traffic that is not HTTP (a database), in the edge window. To an enrolled
host: that host's component, `component:default/<name>`. To another mesh identity
(in-cluster workloads: `<sa>.<ns>.serviceaccount.identity.<mesh>.<td>`): `component:<ns>/<sa>`
-- the identity is the only name the mesh has for the callee, a
ServiceAccount is usually per workload and named after it, and the Kubernetes namespace as the
Backstage namespace keeps two `api` accounts in different namespaces apart. A catalog that
names in-cluster services otherwise shows these as missing entities (Backstage keeps the
relation); the export reports every such ref. Destinations without identity (unmeshed) are
left out and counted.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from agent.errors import MeshagentError
from agent.fsutil import write_atomic
from agent.identity.names import InvalidName, WorkloadIdentity

from .edges import Edge
from .host_meta import HostMeta
from .storage import HostRecord

API_VERSION = "backstage.io/v1alpha1"
KIND = "Component"
COMPONENT_TYPE = "service"
DEFAULT_LIFECYCLE = "production"
DEFAULT_NAMESPACE = "default"
UNKNOWN_OWNER = "unknown"
FILE_NAME = "catalog-info.yaml"
MAX_NAME = 63
TAG = "meshagent"

# Annotation keys (Backstage: `prefix/name`, the prefix a DNS subdomain).
ANNOTATION_HOST_ID = "meshagent.io/host-id"
ANNOTATION_HOST_NAME = "meshagent.io/host-name"
ANNOTATION_IDENTITY = "meshagent.io/identity"
ANNOTATION_SPIFFE_ID = "meshagent.io/spiffe-id"
ANNOTATION_OWNER_CONTACT = "meshagent.io/owner-contact"
ANNOTATION_TIER = "meshagent.io/tier"
ANNOTATION_EXPORTED_BY = "meshagent.io/exported-by"

_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_NOT_NAME_CHAR = re.compile(r"[^a-z0-9._-]+")
_SEPARATOR_RUN = re.compile(r"[-._]{2,}")


class BackstageExportError(MeshagentError):
    code = "backstage_export_failed"


def catalog_url_problem(url: str) -> str | None:
    """Why `url` cannot be the catalog page's base (None when it can): it goes into every
    Component's links, which Backstage renders as anchors, so only an absolute http(s) URL of a
    host, with no query, fragment or credentials (the export appends /catalog/hosts/ID)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError as exc:
        return f"{url[:200]!r} is malformed: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url[:200]!r} is not an absolute http(s) URL (https://HOST:PORT)"
    if parts.query or parts.fragment or parts.username or parts.password:
        return f"{url[:200]!r} has a query, fragment or credentials: give the base URL only"
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        return f"{url[:200]!r} contains whitespace or control characters"
    return None


@dataclass(frozen=True)
class Options:
    lifecycle: str = DEFAULT_LIFECYCLE
    # The authority's catalog page (https://HOST:PORT), for a link per host; "" for none.
    catalog_url: str = ""
    # Why dependsOn is missing ("" when edges were given): put in each document's report.
    edges_unavailable: str = ""


@dataclass(frozen=True)
class Component:
    host_id: str
    host_name: str
    name: str
    doc: dict[str, Any]
    warnings: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        """Where the component goes below --output-dir."""
        return f"{self.name}/{FILE_NAME}"


@dataclass(frozen=True)
class Export:
    components: list[Component]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (host id, why)
    # Refs to components this export does not write (in-cluster identities), for the report.
    external_refs: list[str] = field(default_factory=list)
    unmeshed_edges: int = 0
    edges_unavailable: str = ""

    def report(self) -> dict[str, Any]:
        return {
            "components": [
                {
                    "host_id": c.host_id,
                    "host_name": c.host_name,
                    "name": c.name,
                    "path": c.path,
                    "warnings": list(c.warnings),
                }
                for c in self.components
            ],
            "skipped": [{"host_id": h, "reason": r} for h, r in self.skipped],
            "external_refs": self.external_refs,
            "unmeshed_edges": self.unmeshed_edges,
            "depends_on": "omitted: " + self.edges_unavailable
            if self.edges_unavailable
            else "from observed traffic",
        }


# --- names -------------------------------------------------------------------------------------


def valid_name(value: str) -> bool:
    """Backstage's isValidObjectName (metadata.name, and the name part of a ref)."""
    return 1 <= len(value) <= MAX_NAME and _NAME_RE.match(value) is not None


def sanitize_name(text: str, limit: int = MAX_NAME) -> str:
    """A Backstage name from free text ("" when nothing usable is left)."""
    name = _NOT_NAME_CHAR.sub("-", text.strip().lower())
    name = _SEPARATOR_RUN.sub(lambda m: m.group(0)[0], name)
    return name[:limit].strip("-._")


def component_names(hosts: Sequence[HostRecord]) -> dict[str, str]:
    """Host id -> component name, unique without case; see the module docstring."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for host in sorted(hosts, key=lambda h: (h.enrolled_at, h.id)):
        base = sanitize_name(host.host_name) or "host"
        hexid = host.id.removeprefix("h-")
        candidates = [base] + [
            f"{sanitize_name(base, MAX_NAME - n - 1)}-{hexid[:n]}" for n in (6, len(hexid))
        ]
        name = next((c for c in candidates if c not in taken), "")
        counter = 2
        while not name:  # only when a host's own name is another's suffixed one: still deterministic
            c = f"{sanitize_name(base, MAX_NAME - len(hexid) - 8)}-{hexid}-{counter}"
            name = c if c not in taken else ""
            counter += 1
        taken.add(name)
        names[host.id] = name
    return names


def entity_ref(kind: str, name: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    return f"{kind}:{namespace}/{name}"


def _ref_or_none(kind: str, text: str) -> str | None:
    name = sanitize_name(text)
    return entity_ref(kind, name) if name else None


# --- dependsOn ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dependencies:
    refs: dict[str, list[str]]  # host id -> sorted component refs it depends on
    external_refs: list[str]
    unmeshed: int


def identity_ref(identity: str) -> str | None:
    """`component:<ns>/<sa>` for a mesh DNS identity (None if it is not one, or the parts are
    not Backstage names: a namespace must be a DNS label)."""
    try:
        wid = WorkloadIdentity.from_dns_name(identity)
    except InvalidName:
        return None
    if not _DNS_LABEL_RE.match(wid.namespace) or len(wid.namespace) > MAX_NAME:
        return None
    name = sanitize_name(wid.name)
    return entity_ref("component", name, wid.namespace) if name else None


def depends_on(
    hosts: Sequence[HostRecord],
    names: Mapping[str, str],
    edges: Iterable[Edge],
    identity_of: Callable[[HostRecord], str],
) -> Dependencies:
    """What each host calls, as Backstage refs, from the edges out of it (it is the client).

    An edge end that names no host (src_host / dst_host None) but carries an identity exported
    hosts share stands for all of them: edges.py takes the callee's view of host-to-host calls,
    which cannot tell apart callers of one identity, and hosts of one identity are replicas of
    one service, serving and calling together."""
    by_identity: dict[str, list[str]] = {}
    for host in hosts:
        if host.id in names:
            by_identity.setdefault(identity_of(host), []).append(host.id)
    refs: dict[str, set[str]] = {}
    external: set[str] = set()
    unmeshed = 0
    for edge in edges:  # each one traffic in the window (edges.py leaves idle series out)
        if edge.src_host is not None:
            callers = [edge.src_host] if edge.src_host in names else []
        else:
            callers = by_identity.get(edge.src, []) if edge.src else []
        if not callers:
            continue  # not a call an exported host made
        if edge.dst_host is not None and edge.dst_host in names:
            targets = [edge.dst_host]
        else:
            targets = by_identity.get(edge.dst, []) if edge.dst else []
        if targets:
            for caller in callers:
                refs.setdefault(caller, set()).update(
                    entity_ref("component", names[t]) for t in targets if t != caller
                )
            continue
        ref = identity_ref(edge.dst) if edge.dst else None
        if ref is None:
            unmeshed += 1
            continue
        external.add(ref)
        for caller in callers:
            refs.setdefault(caller, set()).add(ref)
    return Dependencies({h: sorted(r) for h, r in refs.items()}, sorted(external), unmeshed)


# --- the documents -----------------------------------------------------------------------------


def component_doc(
    host: HostRecord,
    name: str,
    meta: HostMeta,
    spiffe_id: str,
    depends: Sequence[str] | None,
    options: Options,
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """One host's entity and the warnings about it (what a reader should fix)."""
    warnings: list[str] = []
    annotations = {
        ANNOTATION_EXPORTED_BY: "meshagent",
        ANNOTATION_HOST_ID: host.id,
        ANNOTATION_HOST_NAME: host.host_name,
        ANNOTATION_IDENTITY: host.identity,
        ANNOTATION_SPIFFE_ID: spiffe_id,
    }
    if meta.owner_contact:
        annotations[ANNOTATION_OWNER_CONTACT] = meta.owner_contact
    if meta.tier:
        annotations[ANNOTATION_TIER] = meta.tier
    tags = [TAG]
    tier_tag = sanitize_name(f"tier-{meta.tier}").replace(".", "-").replace("_", "-") if meta.tier else ""
    if tier_tag and _DNS_LABEL_RE.match(tier_tag):
        tags.append(tier_tag)
    metadata: dict[str, Any] = {"name": name, "title": host.host_name}
    if meta.description:
        metadata["description"] = meta.description
    metadata["annotations"] = dict(sorted(annotations.items()))
    metadata["tags"] = sorted(tags)
    links = [{"url": url, "title": title} for title, url in sorted(meta.links)]
    if options.catalog_url:
        links.append(
            {
                "url": f"{options.catalog_url.rstrip('/')}/catalog/hosts/{host.id}",
                "title": "meshagent catalog",
            }
        )
    if links:
        metadata["links"] = links

    owner = _ref_or_none("group", meta.owner_team)
    if owner is None:
        owner = UNKNOWN_OWNER
        warnings.append("no owner team (set one: meshagent authority host set HOST --owner-team TEAM)")
    spec: dict[str, Any] = {"type": COMPONENT_TYPE, "lifecycle": options.lifecycle, "owner": owner}
    system = _ref_or_none("system", meta.system)
    if system is not None:
        spec["system"] = system
    elif meta.system:
        warnings.append(f"system {meta.system!r} has no usable name (letters or digits) and is left out")
    if depends is not None:
        spec["dependsOn"] = list(depends)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}, tuple(warnings)


def export(
    hosts: Sequence[HostRecord],
    metas: Mapping[str, HostMeta],
    edges: Iterable[Edge] | None,
    identity_of: Callable[[HostRecord], str],
    spiffe_id_of: Callable[[HostRecord], str],
    options: Options = Options(),
) -> Export:
    """The components of every unrevoked host, sorted by name. `edges` None: Prometheus was not
    available (options.edges_unavailable says why) and no dependsOn is written."""
    if not valid_name(options.lifecycle):
        raise BackstageExportError(
            f"lifecycle {options.lifecycle[:80]!r} is not a Backstage name",
            "use a word such as production, experimental or deprecated",
        )
    if options.catalog_url and (problem := catalog_url_problem(options.catalog_url)):
        raise BackstageExportError(f"catalog URL {problem}", "e.g. https://authority.example:8443")
    live = [h for h in hosts if not h.revoked]
    skipped = sorted((h.id, "revoked") for h in hosts if h.revoked)
    names = component_names(live)
    deps = depends_on(live, names, edges, identity_of) if edges is not None else None
    components = []
    for host in live:
        doc, warnings = component_doc(
            host,
            names[host.id],
            metas.get(host.id, HostMeta()),
            spiffe_id_of(host),
            None if deps is None else deps.refs.get(host.id, []),
            options,
        )
        components.append(Component(host.id, host.host_name, names[host.id], doc, warnings))
    components.sort(key=lambda c: c.name)
    return Export(
        components,
        skipped,
        [] if deps is None else deps.external_refs,
        0 if deps is None else deps.unmeshed,
        (options.edges_unavailable or "no edges given") if edges is None else "",
    )


def render(doc: Mapping[str, Any]) -> str:
    """One document as YAML (PyYAML's safe dumper: every string is data, quoted when needed)."""
    return yaml.safe_dump(
        dict(doc), sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000
    )


def render_stream(components: Sequence[Component]) -> str:
    return "".join("---\n" + render(c.doc) for c in components)


# --- files -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    written: list[str]  # paths below the directory, changed or new
    unchanged: list[str]
    stale: list[str]  # earlier exports' files of hosts no longer exported (kept unless pruned)
    pruned: list[str]


def _exported_by_us(path: Path) -> bool:
    """Whether `path` is a catalog-info.yaml this export wrote (its annotation says so): only
    those are ever reported stale or pruned."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    annotations = doc.get("metadata", {}).get("annotations", {}) if isinstance(doc, dict) else {}
    return isinstance(annotations, dict) and annotations.get(ANNOTATION_EXPORTED_BY) == "meshagent"


LOCATION_NAME = "meshagent-hosts"


def location_doc(components: Sequence[Component]) -> dict[str, Any]:
    """The Location at the directory's root listing every component's file (relative targets:
    Backstage resolves them against the Location's own place, file or URL), so one registration
    follows the fleet, and a host no longer exported leaves Backstage with the next export."""
    return {
        "apiVersion": API_VERSION,
        "kind": "Location",
        "metadata": {
            "name": LOCATION_NAME,
            "description": "Hosts in the mesh, exported by meshagent authority backstage export",
            "annotations": {ANNOTATION_EXPORTED_BY: "meshagent"},
        },
        "spec": {"targets": sorted(f"./{c.path}" for c in components)},
    }


def _write_if_changed(path: Path, text: str) -> bool:
    """Replace `path` atomically with `text` unless it holds it already; whether it wrote."""
    try:
        if path.is_file() and path.read_text() == text:
            return False
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, text.encode(), mode=0o644)
    except OSError as exc:
        raise BackstageExportError(
            f"cannot write {path}: {exc.strerror}", "check the directory's permissions and free space"
        ) from exc
    return True


def write_tree(result: Export, directory: Path, prune: bool = False) -> Written:
    """`<name>/catalog-info.yaml` per component below `directory`, and `catalog-info.yaml` at its
    root (the Location of them all), each replaced atomically and only when its text changed (a
    GitOps diff shows real changes only)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackstageExportError(
            f"cannot create {directory}: {exc.strerror}", "choose another --output-dir"
        ) from exc
    written: list[str] = []
    unchanged: list[str] = []
    files = [(c.path, c.doc) for c in result.components] + [(FILE_NAME, location_doc(result.components))]
    for rel, doc in files:
        (written if _write_if_changed(directory / rel, render(doc)) else unchanged).append(rel)
    current = {c.path for c in result.components}
    stale = sorted(
        p.relative_to(directory).as_posix()
        for p in directory.glob(f"*/{FILE_NAME}")
        if p.relative_to(directory).as_posix() not in current and _exported_by_us(p)
    )
    pruned = []
    if prune:
        for rel in stale:
            (directory / rel).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the directory may hold other files: keep it then
                (directory / rel).parent.rmdir()
            pruned.append(rel)
    return Written(written, unchanged, stale, pruned)
