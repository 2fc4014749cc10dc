"""SLOs on Prometheus: error budgets now, their burn over time, and the rule file that alerts.

Every number is PromQL over the series the agents export (agent/telemetry/proxy_metrics.py), as
Prometheus scrapes them through the discovery endpoint, which adds `host_id` to each:

- availability: the error ratio is responses `classification="failure"` over all responses of
  the SLO's direction (and `target_port`, if the SLO names a port) on that host;
- latency: the error ratio is 1 - (responses in `response_latency_ms_bucket{le=THRESHOLD}`) /
  (all timed responses). The threshold is one of the histogram's bounds (host_meta checks it),
  so the ratio is exact, not interpolated.

Where a budget's numbers come from (`Budget.source`): the rule file (`rules`) records, per SLO,
the error ratio over 5m..3d and over the SLO's own window, and a marker
(`meshagent_slo:objective{host_id, slo, spec}`) saying which SLO shape the records are for. When
the marker for a host's SLO is present with the SLO's current shape, budgets read the recorded
series ("rules": a few cheap instant queries whatever the window); otherwise (rules not loaded,
or written before the SLO changed) the raw series ("raw": `rate(...[28d])` over every raw
sample, slow for a big fleet). The recorded window ratio is Sloth's and Pyrra's way, weighted by
traffic: the sum over the window of the recorded 5 m error rate over the sum of the 5 m request
rate. It covers only the time since the rules for the SLO's current shape were loaded (until a
whole window has passed): those records carry the shape (`spec`), so a changed port, direction,
kind or threshold starts new series rather than summing the old shape's history. A 1 d or 3 d
SLO window is the `rate1d`/`rate3d` record itself (a rate() over the raw series).

Budget arithmetic (the SRE workbook's): the budget is the error ratio the objective allows,
1 - objective. A burn rate is an error ratio divided by that budget (1 = spending the budget
exactly over the SLO window). The rules (`rules`) are the workbook's multi-window, multi-burn-rate
alerts: long window AND short window above the factor, so an alert both needs enough spend to
matter and stops soon after the spend stops.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .host_meta import HostMeta, Slo
from .prom_query import PromClient
from .storage import HostRecord

# The recording rules' windows and what each is called in a rule name.
WINDOWS: Final = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
# labels: host_id, slo (and spec, for an SLO window not in WINDOWS: summed from the 5 m rates)
RECORD: Final = "meshagent_slo:error_ratio:rate{window}"
ERRORS_5M: Final = "meshagent_slo:errors:rate5m"  # failing responses/s (labels: host_id, slo, spec)
REQUESTS_5M: Final = "meshagent_slo:requests:rate5m"  # all responses/s the SLO counts
MARKER: Final = "meshagent_slo:objective"  # value: the objective; labels: host_id, slo, spec
FAILURE: Final = 'classification="failure"'


@dataclass(frozen=True)
class BurnAlert:
    name: str
    long: str
    short: str
    factor: float
    severity: str
    what: str  # the budget share this spends, for the summary


# The SRE workbook's table (chapter 5, "Multiwindow, Multi-Burn-Rate Alerts"), for a 30-day
# window: 2 % of the budget in 1 h, 5 % in 6 h page; 10 % in 1 d, 10 % in 3 d open a ticket.
ALERTS: Final = (
    BurnAlert("MeshagentSLOFastBurn", "1h", "5m", 14.4, "page", "2% of a 30-day budget in 1 h"),
    BurnAlert("MeshagentSLOMediumBurn", "6h", "30m", 6.0, "page", "5% of a 30-day budget in 6 h"),
    BurnAlert("MeshagentSLOSlowBurn", "1d", "2h", 3.0, "ticket", "10% of a 30-day budget in 1 d"),
    BurnAlert("MeshagentSLOVerySlowBurn", "3d", "6h", 1.0, "ticket", "10% of a 30-day budget in 3 d"),
)


@dataclass(frozen=True)
class Budget:
    host_id: str
    slo: Slo
    sli: float | None  # good ratio over the SLO window (None: no traffic yet)
    remaining: float | None  # fraction of the error budget left, 1.0 = untouched, < 0 = overspent
    burn_1h: float | None
    burn_6h: float | None
    exhaustion_s: float | None  # at the current (1 h) burn; None when not burning
    # "rules": read from the rule file's recorded series; "raw": computed from the agents'
    # series (the rules are not loaded in that Prometheus, or predate the SLO's current shape)
    source: str = "raw"

    def to_doc(self) -> dict[str, Any]:
        return {
            "host_id": self.host_id,
            "slo": self.slo.to_doc(),
            "sli": self.sli,
            "remaining": self.remaining,
            "burn_1h": self.burn_1h,
            "burn_6h": self.burn_6h,
            "exhaustion_s": self.exhaustion_s,
            "source": self.source,
        }


def spec(slo: Slo) -> str:
    """What the recorded ratios of `slo` depend on (not the objective: budgets apply it), as the
    marker's `spec` label: records written for another shape are not this SLO's."""
    port = "" if slo.port is None else str(slo.port)
    threshold = "" if slo.threshold_ms is None else str(slo.threshold_ms)
    return f"{slo.kind},{slo.direction},{port},{threshold},{slo.window_days}d"


def quote(value: str) -> str:
    """A PromQL string literal (double-quoted, Go escapes)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _selector(host_id: str | None, slo: Slo, *extra: str) -> str:
    matchers = [f"direction={quote(slo.direction)}"]
    # The whole fleet: only series a host's agent wrote (in-cluster proxies write the same
    # families without host_id).
    matchers.append('host_id!=""' if host_id is None else f"host_id={quote(host_id)}")
    if slo.port is not None:
        matchers.append(f"target_port={quote(str(slo.port))}")
    return "{" + ",".join([*matchers, *extra]) + "}"


def _le(slo: Slo) -> str:
    """The latency threshold's bucket: le as the agent writes it ("300") and as Prometheus 3
    normalizes it ("300.0")."""
    return f'le=~"{slo.threshold_ms}(\\\\.0)?"'


def error_ratio(host_id: str | None, slo: Slo, window: str) -> str:
    """PromQL: the SLO's error ratio on `host_id` over `window` (no result: no traffic). With
    host_id None, one sample per host (`by (host_id)`) for every host with traffic: the same SLO
    shape for the whole fleet in one query."""
    total_of = "sum" if host_id is not None else "sum by (host_id)"
    if slo.kind == "latency":
        le = _le(slo)
        good = f"{total_of}(rate(response_latency_ms_bucket{_selector(host_id, slo, le)}[{window}]))"
        total = f"{total_of}(rate(response_latency_ms_count{_selector(host_id, slo)}[{window}]))"
        return f"1 - ({good} / {total})"
    failed = f"{total_of}(rate(response_total{_selector(host_id, slo, FAILURE)}[{window}]))"
    total = f"{total_of}(rate(response_total{_selector(host_id, slo)}[{window}]))"
    # No failure series at all is a ratio of 0, not no answer: `or 0 * total`.
    return f"({failed} or 0 * {total}) / {total}"


def _rates(host_id: str, slo: Slo) -> tuple[str, str]:
    """PromQL: the SLO's failing and total responses per second over 5 m on `host_id` (the
    parts the window ratio is summed from)."""
    if slo.kind == "latency":
        le = _le(slo)
        total = f"sum(rate(response_latency_ms_count{_selector(host_id, slo)}[5m]))"
        good = f"sum(rate(response_latency_ms_bucket{_selector(host_id, slo, le)}[5m]))"
        return f"{total} - {good}", total
    total = f"sum(rate(response_total{_selector(host_id, slo)}[5m]))"
    return f"sum(rate(response_total{_selector(host_id, slo, FAILURE)}[5m])) or 0 * {total}", total


def error_budget(slo: Slo) -> float:
    """The error ratio the objective allows (0.001 for 99.9 %)."""
    return 1.0 - slo.objective / 100.0


def _finite(samples: list[tuple[dict[str, str], float]]) -> float | None:
    values = [v for _, v in samples if math.isfinite(v)]
    return values[0] if values else None


def _budget(
    host_id: str,
    slo: Slo,
    over_window: float | None,
    ratio_1h: float | None,
    ratio_6h: float | None,
    source: str = "raw",
) -> Budget:
    """The budget from the three error ratios (None: no traffic in that window)."""
    allowed = error_budget(slo)
    remaining = None if over_window is None else 1.0 - over_window / allowed
    burn_1h = None if ratio_1h is None else ratio_1h / allowed
    return Budget(
        host_id=host_id,
        slo=slo,
        sli=None if over_window is None else 1.0 - over_window,
        remaining=remaining,
        burn_1h=burn_1h,
        burn_6h=None if ratio_6h is None else ratio_6h / allowed,
        exhaustion_s=exhaustion_s(remaining, burn_1h, slo.window_days),
        source=source,
    )


def budget(prom: PromClient, host_id: str, slo: Slo) -> Budget:
    """One SLO's budget now (the rules' records when loaded, else the raw series)."""
    return budgets(prom, host_id, HostMeta(slos=(slo,)))[0]


def exhaustion_s(remaining: float | None, burn: float | None, window_days: int) -> float | None:
    """Seconds until the budget is spent at `burn` (1 spends a whole budget in the SLO window);
    0 when already spent, None when not burning or unknown."""
    if remaining is None or burn is None or burn <= 0:
        return None
    if remaining <= 0:
        return 0.0
    return remaining * window_days * 86400.0 / burn


def budgets(prom: PromClient, host_id: str, meta: HostMeta) -> list[Budget]:
    """Every SLO of the host, in the order its metadata lists them."""
    return _budgets_of(prom, {host_id: meta}, host_id)[host_id]


def fleet_budgets(prom: PromClient, metas: Mapping[str, HostMeta]) -> dict[str, list[Budget]]:
    """`budgets` for many hosts at once (the fleet list, `slo status`): the recorded series in
    one query per record (the marker, 1 h, 6 h, each SLO window in use) for the whole fleet; the
    SLOs without loaded rules in one query per SLO shape (kind, direction, port, threshold) and
    window, instead of three per SLO per host."""
    return _budgets_of(prom, metas, None)


def _budgets_of(
    prom: PromClient, metas: Mapping[str, HostMeta], host_id: str | None
) -> dict[str, list[Budget]]:
    """Budgets of `metas`' hosts (`host_id`: the one host they are, which narrows the queries)."""
    at = time.time()  # every window ends at the same instant
    one = f"{{host_id={quote(host_id)}}}" if host_id is not None else ""
    # name -> (host_id, slo, spec) -> (value, labels); spec "" for the records without one
    recorded: dict[str, dict[tuple[str, str, str], tuple[float, dict[str, str]]]] = {}

    def record(name: str) -> dict[tuple[str, str, str], tuple[float, dict[str, str]]]:
        if name not in recorded:
            recorded[name] = {
                (labels.get("host_id", ""), labels.get("slo", ""), labels.get("spec", "")): (value, labels)
                for labels, value in prom.query(name + one, at)
            }
        return recorded[name]

    wanted = any(meta.slos for meta in metas.values())
    markers = record(MARKER) if wanted else {}
    raw: dict[tuple[Any, ...], dict[str, float]] = {}

    def raw_ratio(hid: str, slo: Slo, window: str) -> float | None:
        key = (slo.kind, slo.direction, slo.port, slo.threshold_ms, window)
        if key not in raw:
            raw[key] = {
                labels.get("host_id", ""): value
                for labels, value in prom.query(error_ratio(host_id, slo, window), at)
                if math.isfinite(value)
            }
        return raw[key].get(hid) if host_id is None else _only(raw[key])

    def rules_ratio(hid: str, slo: Slo, window: str) -> float | None:
        # A window summed from the 5 m rates is read for the SLO's current shape only; the
        # WINDOWS records are rate()s over the raw series, evaluated with the current rules.
        shape = "" if window in WINDOWS else spec(slo)
        found = record(RECORD.format(window=window)).get((hid, slo.name, shape))
        return found[0] if found is not None and math.isfinite(found[0]) else None

    def one_budget(hid: str, slo: Slo) -> Budget:
        days = f"{slo.window_days}d"
        if (hid, slo.name, spec(slo)) in markers:
            ratio, source = rules_ratio, "rules"
        else:
            ratio, source = raw_ratio, "raw"
        return _budget(
            hid, slo, ratio(hid, slo, days), ratio(hid, slo, "1h"), ratio(hid, slo, "6h"), source=source
        )

    return {hid: [one_budget(hid, slo) for slo in meta.slos] for hid, meta in metas.items()}


def _only(answer: dict[str, float]) -> float | None:
    """The value of a one-host query (no `by (host_id)`: its one sample has no labels)."""
    return next(iter(answer.values()), None)


def burn_history(
    prom: PromClient, host_id: str, slo: Slo, span_s: float, step_s: float, end: float | None = None
) -> list[tuple[float, float]]:
    """The burn rate over the preceding hour, every `step_s` over the last `span_s` seconds
    (up to `end`, default now): [(unix time, burn)], steps without traffic left out. A burn of 1
    spends the budget exactly over the SLO window; 14.4 is the fast-burn page's line."""
    stop = time.time() if end is None else end
    allowed = error_budget(slo)
    series = prom.query_range(error_ratio(host_id, slo, "1h"), stop - span_s, stop, step_s)
    if not series:
        return []
    return [(t, v / allowed) for t, v in series[0][1] if math.isfinite(v)]


def _template_text(text: str) -> str:
    """Prometheus expands alert labels and annotations as Go templates: text from people (owner
    team, host name, SLO description) must not run as one, so "{{" is written as a template that
    prints "{{"."""
    return text.replace("{{", '{{"{{"}}')


def _runbook(meta: HostMeta) -> str | None:
    for title, url in meta.links:
        if title.strip().lower() in ("runbook", "runbook_url", "playbook"):
            return url
    return None


def _host_rules(host: HostRecord, meta: HostMeta) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for slo in meta.slos:
        ids = {"host_id": host.id, "slo": slo.name}
        for window in WINDOWS:
            out.append(
                {
                    "record": RECORD.format(window=window),
                    "expr": error_ratio(host.id, slo, window),
                    "labels": dict(ids),
                }
            )
        days = f"{slo.window_days}d"
        shape = {**ids, "spec": spec(slo)}
        if days not in WINDOWS:  # 1d, 3d: the record above is already the SLO window's ratio
            # The SLO window's ratio from the 5 m rates (budgets read it: a 28-d rate() over raw
            # samples is too slow for a fleet). Labelled with the shape, and summed over that
            # shape's 5 m rates only: after a port/kind/threshold change the window starts anew
            # instead of mixing the old selector's history into the new one's.
            errors, requests = _rates(host.id, slo)
            match = "{" + f"host_id={quote(host.id)},slo={quote(slo.name)},spec={quote(spec(slo))}" + "}"
            out += [
                {"record": ERRORS_5M, "expr": errors, "labels": dict(shape)},
                {"record": REQUESTS_5M, "expr": requests, "labels": dict(shape)},
                {
                    "record": RECORD.format(window=days),
                    "expr": f"sum_over_time({ERRORS_5M}{match}[{days}])"
                    f" / sum_over_time({REQUESTS_5M}{match}[{days}])",
                    "labels": dict(shape),
                },
            ]
        # the marker saying these records are this SLO's current shape
        out.append({"record": MARKER, "expr": f"vector({slo.objective:g})", "labels": dict(shape)})
        allowed = error_budget(slo)
        runbook = _runbook(meta)
        for alert in ALERTS:
            threshold = f"{alert.factor * allowed:.10g}"
            match = "{" + f"host_id={quote(host.id)},slo={quote(slo.name)}" + "}"
            long_ratio = RECORD.format(window=alert.long) + match
            short_ratio = RECORD.format(window=alert.short) + match
            annotations = {
                "summary": _template_text(
                    f"{host.host_name} ({host.id}) SLO {slo.name!r} burns its error budget over "
                    f"{alert.factor:g}x too fast ({alert.long} and {alert.short}): {alert.what}"
                ),
                "description": _template_text(f"SLO: {slo.describe()}. Error ratio over {alert.long}: ")
                + "{{ $value | humanizePercentage }}"
                + _template_text(f" (budget {allowed:.6g}, alert above {threshold})."),
            }
            if runbook is not None:
                annotations["runbook_url"] = _template_text(runbook)
            out.append(
                {
                    "alert": alert.name,
                    "expr": f"{long_ratio} > {threshold} and {short_ratio} > {threshold}",
                    "labels": {
                        "host_id": host.id,
                        "host": _template_text(host.host_name),
                        "owner_team": _template_text(meta.owner_team),
                        "slo": slo.name,
                        "severity": alert.severity,
                    },
                    "annotations": annotations,
                }
            )
    return out


def rules(hosts: Sequence[tuple[HostRecord, HostMeta]]) -> dict[str, Any]:
    """The Prometheus rule file for every SLO of `hosts`: one group per host with an SLO (so a
    host's recording rules are evaluated before the alerts that read them), hosts sorted by id."""
    groups = []
    for host, meta in sorted(hosts, key=lambda pair: pair[0].id):
        if not meta.slos:
            continue
        groups.append({"name": f"meshagent-slo-{host.id}", "rules": _host_rules(host, meta)})
    return {"groups": groups}


RULES_HEADER: Final = """\
# Prometheus rules for meshagent's SLOs, written by `meshagent authority slo rules`.
# Regenerate after changing a host's SLOs; load with rule_files: [this file] and reload Prometheus.
# Alerts: MeshagentSLOFastBurn (1h/5m, 14.4x, page), MeshagentSLOMediumBurn (6h/30m, 6x, page),
# MeshagentSLOSlowBurn (1d/2h, 3x, ticket), MeshagentSLOVerySlowBurn (3d/6h, 1x, ticket).
# The factors are burn rates (how many times faster than the SLO allows), the SRE workbook's for
# a 30-day window, used unscaled for every window: the budget share an alert stands for is
# factor x long window / SLO window (14.4x over 1 h: 2 % of 30 days, 2.1 % of 28, 8.6 % of 7).
"""


def never_firing(hosts: Sequence[tuple[HostRecord, HostMeta]]) -> list[str]:
    """Why some alerts of `hosts` can never fire: an alert fires above factor x (1 - objective),
    an error ratio of 1 or more when the objective is at most 1 - 1/factor (93.06 % for the
    fast burn, 83.3 % for 6x, 66.7 % for 3x): not even 100 % failures reach it. One line per SLO."""
    out = []
    for host, meta in sorted(hosts, key=lambda pair: pair[0].id):
        for slo in meta.slos:
            dead = [a for a in ALERTS if a.factor * error_budget(slo) >= 1.0]
            if not dead:
                continue
            names = ", ".join(
                f"{a.name} ({a.factor:g}x, needs > {100 * (1 - 1 / a.factor):.2f}%)" for a in dead
            )
            out.append(
                f"{host.host_name} ({host.id}) SLO {slo.name!r} at {slo.objective:g}%: "
                f"can never fire: {names}"
            )
    return out


def render_rules(hosts: Sequence[tuple[HostRecord, HostMeta]]) -> str:
    """`rules(hosts)` as the YAML file Prometheus loads, with a header saying what it is."""
    import yaml

    # libyaml's dumper when PyYAML has it: the pure-Python one takes ~40 s for 1,000 hosts
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    # host names are the registry's (printable, one line); a newline would end the comment
    warnings = "".join(f"# WARNING: {' '.join(w.splitlines())}\n" for w in never_firing(hosts))
    return (
        RULES_HEADER
        + warnings
        + yaml.dump(rules(hosts), Dumper=dumper, sort_keys=False, width=1000, allow_unicode=True)
    )
