"""The generated SLO rule file, judged by Prometheus's own tools: `promtool check rules` says it is
valid, `promtool test rules` (Prometheus's rule engine on synthetic series, virtual time) says
the burn-rate alerts fire when the budget burns and stay quiet when it does not."""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from agent.authority.host_meta import HostMeta, Slo
from agent.authority.service import Authority
from agent.authority.slo import (
    ALERTS,
    ERRORS_5M,
    REQUESTS_5M,
    WINDOWS,
    error_ratio,
    render_rules,
    rules,
    spec,
)
from agent.authority.storage import HostRecord
from agent.cli.main import cli as meshagent
from agent.identity.pki import generate_key, make_csr
from tests.authority.promserver import host_record
from tests.support import init_authority

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (scripts/bootstrap)")


def host(host_id: str, name: str) -> HostRecord:
    return host_record(host_id, name, f"shop/{host_id}")


AVAIL = Slo("availability", "availability", 99.9)
LATENCY = Slo("latency", "latency", 99.9, threshold_ms=300)
HOSTS = [
    # 20 % failures / 20 % slow; the owner team is text that looks like a template
    (
        host("bad", "bad-1"),
        HostMeta(owner_team="{{ 1 }} team", links=(("runbook", "https://rb/bad"),), slos=(AVAIL, LATENCY)),
    ),
    # 0.05 % failures / slow: half the budget's pace
    (host("good", "good-1"), HostMeta(owner_team="good-team", slos=(AVAIL, LATENCY))),
    # more shapes for check rules: a port, outbound, a longer window, no SLO at all
    (
        host("more", "more-1"),
        HostMeta(
            slos=(
                Slo("api-port", "availability", 99.5, window_days=7, port=8080),
                Slo("calls-out", "latency", 95.0, threshold_ms=1000, direction="outbound"),
            )
        ),
    ),
    (host("none", "none-1"), HostMeta(owner_team="x")),
]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_the_rule_file_is_valid_and_complete(tmp_path: Path) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(render_rules(HOSTS))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    slos = 2 + 2 + 2
    # per SLO: the windows' ratios, the 5 m errors and requests, the SLO window's ratio, the marker
    assert f"SUCCESS: {slos * (len(WINDOWS) + 4 + len(ALERTS))} rules found" in checked.stdout
    doc = yaml.safe_load(path.read_text())
    assert [g["name"] for g in doc["groups"]] == [
        "meshagent-slo-bad",
        "meshagent-slo-good",
        "meshagent-slo-more",
    ]
    alerts = [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
    assert {r["alert"] for r in alerts} == {
        "MeshagentSLOFastBurn",
        "MeshagentSLOMediumBurn",
        "MeshagentSLOSlowBurn",
        "MeshagentSLOVerySlowBurn",
    }
    assert all(set(r["labels"]) == {"host_id", "host", "owner_team", "slo", "severity"} for r in alerts)
    assert {r["labels"]["severity"] for r in alerts} == {"page", "ticket"}
    port = next(r for r in doc["groups"][2]["rules"] if r.get("labels", {}).get("slo") == "api-port")
    assert 'target_port="8080"' in port["expr"]
    assert 'direction="outbound"' in error_ratio("more", HOSTS[2][1].slos[1], "5m")


def series(host_id: str, failing_per_min: float, total_per_min: float, minutes: int) -> list[dict[str, str]]:
    """Agent-format inbound series for `minutes`, as Prometheus scrapes them through discovery:
    responses (success/failure) and a latency histogram whose `le="300"` bucket misses exactly
    the failing share (so the latency SLO burns as the availability one does)."""
    ok = total_per_min - failing_per_min
    base = f'direction="inbound",host_id="{host_id}",target_port="8080",tls="true",client_id="c"'
    grow = lambda per_min: f"0+{per_min:g}x{minutes}"  # noqa: E731
    out = [
        {
            "series": f'response_total{{{base},status_code="200",classification="success"}}',
            "values": grow(ok),
        },
        {
            "series": f'response_total{{{base},status_code="500",classification="failure"}}',
            "values": grow(failing_per_min),
        },
        {"series": f'response_latency_ms_bucket{{{base},status_code="200",le="300"}}', "values": grow(ok)},
        {
            "series": f'response_latency_ms_bucket{{{base},status_code="200",le="+Inf"}}',
            "values": grow(total_per_min),
        },
        {"series": f'response_latency_ms_count{{{base},status_code="200"}}', "values": grow(total_per_min)},
    ]
    return out


def expected(host_id: str, name: str, team: str, slo: str, runbook: str | None, value: str) -> dict[str, Any]:
    alert = ALERTS[0]
    what = "succeed" if slo == "availability" else "answer under 300 ms"
    annotations = {
        "summary": f"{name} ({host_id}) SLO '{slo}' burns its error budget over 14.4x too fast "
        f"(1h and 5m): {alert.what}",
        "description": f"SLO: 99.9% of inbound requests {what} over 28 d. Error ratio over 1h: {value} "
        "(budget 0.001, alert above 0.0144).",
    }
    if runbook:
        annotations["runbook_url"] = runbook
    return {
        "exp_labels": {"host_id": host_id, "host": name, "owner_team": team, "slo": slo, "severity": "page"},
        "exp_annotations": annotations,
    }


def test_fast_burn_fires_for_20_percent_failures_and_not_for_half_the_budget(tmp_path: Path) -> None:
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules(HOSTS[:2])))
    fast = "MeshagentSLOFastBurn"
    bad = [
        expected("bad", "bad-1", "{{ 1 }} team", slo, "https://rb/bad", "20%")
        for slo in ("availability", "latency")
    ]
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                # 600 responses a minute: "bad" fails 120 (20 %), "good" 0.3 (0.05 %)
                "input_series": series("bad", 120, 600, 120) + series("good", 0.3, 600, 120),
                "alert_rule_test": [
                    # an hour of 20 % is 200x the budget's pace: both windows over 14.4x
                    {"eval_time": "65m", "alertname": fast, "exp_alerts": bad},
                    # the SLO's own pace halved never pages; and no other alert fires for it
                    {"eval_time": "110m", "alertname": fast, "exp_alerts": bad},
                ],
                "promql_expr_test": [
                    {
                        # the SLO window's ratio budgets read: the 5 m rates summed, traffic-weighted
                        "expr": 'round(1e6 * meshagent_slo:error_ratio:rate28d{host_id="good"})',
                        "eval_time": "65m",
                        "exp_samples": [
                            {"labels": f'{{host_id="good",slo="{s.name}",spec="{spec(s)}"}}', "value": 500}
                            for s in (AVAIL, LATENCY)
                        ],
                    },
                    {
                        "expr": 'meshagent_slo:objective{host_id="bad"}',
                        "eval_time": "1m",
                        "exp_samples": [
                            {
                                "labels": "meshagent_slo:objective"
                                f'{{host_id="bad",slo="{s.name}",spec="{spec(s)}"}}',
                                "value": 99.9,
                            }
                            for s in (AVAIL, LATENCY)
                        ],
                    },
                    {
                        # in parts per million, rounded: the engine's float sums are not exact
                        "expr": 'round(1e6 * meshagent_slo:error_ratio:rate1h{host_id="good"})',
                        "eval_time": "65m",
                        "exp_samples": [
                            {
                                "labels": f'{{host_id="good",slo="{s}"}}',
                                "value": 500,
                            }
                            for s in ("availability", "latency")
                        ],
                    },
                ],
            },
            {
                "interval": "1m",
                # a clean hour, then 20 % failures for 3 minutes: the 1 h ratio is 1 %, under 14.4x
                # the budget (1.44 %), so no page yet though the 5 m window is far over
                "input_series": _onset("bad"),
                "alert_rule_test": [{"eval_time": "63m", "alertname": fast, "exp_alerts": []}],
            },
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    ran = promtool("test", "rules", str(tmp_path / "test.yml"))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "SUCCESS" in ran.stdout


def _onset(host_id: str) -> list[dict[str, str]]:
    """A clean hour at 600/min, then 3 minutes at 20 % failures (series values written out)."""
    base = f'direction="inbound",host_id="{host_id}",target_port="8080",tls="true",client_id="c"'
    clean, bad_minutes = 60, 3
    ok = [600 * m for m in range(clean + 1)] + [600 * clean + 480 * m for m in range(1, bad_minutes + 1)]
    failed = [0] * (clean + 1) + [120 * m for m in range(1, bad_minutes + 1)]
    total = [600 * m for m in range(clean + bad_minutes + 1)]
    text = lambda values: " ".join(str(v) for v in values)  # noqa: E731
    return [
        {"series": f'response_total{{{base},classification="success"}}', "values": text(ok)},
        {"series": f'response_total{{{base},classification="failure"}}', "values": text(failed)},
        {"series": f'response_latency_ms_bucket{{{base},le="300"}}', "values": text(ok)},
        {"series": f"response_latency_ms_count{{{base}}}", "values": text(total)},
    ]


def test_alerts_that_can_never_fire_are_warned_about_in_the_file_and_on_stderr(tmp_path: Path) -> None:
    """An alert fires above factor x (1 - objective): at 90 % the fast burn's threshold is an
    error ratio of 1.44, which not even 100 % failures reach."""
    low = [
        (host("low", "low-1"), HostMeta(slos=(Slo("loose", "availability", 90.0),))),
        (host("lower", "lower-1"), HostMeta(slos=(Slo("looser", "availability", 60.0),))),
        HOSTS[0],
    ]
    text = render_rules(low)
    warnings = [line for line in text.splitlines() if line.startswith("# WARNING: ")]
    assert len(warnings) == 2, warnings  # "bad" at 99.9 % can fire every alert
    assert (
        "low-1 (low) SLO 'loose' at 90%: can never fire: MeshagentSLOFastBurn (14.4x, needs > 93.06%)"
        in (warnings[0])
    )
    assert "Medium" not in warnings[0]
    for name in ("MeshagentSLOFastBurn", "MeshagentSLOMediumBurn", "MeshagentSLOSlowBurn"):
        assert name in warnings[1]
    assert "VerySlow" not in warnings[1]
    path = tmp_path / "rules.yml"
    path.write_text(text)
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # the CLI says so on stderr, whether it prints the file or writes it
    directory = tmp_path / "authority"
    init_authority(directory)
    authority = Authority.open(directory)
    secret = authority.create_tokens("shop/low", "https://127.0.0.1:1", timedelta(minutes=5))[0].secret
    enrolled = authority.enroll(secret, make_csr(generate_key()).decode(), "low-1", ["198.18.0.10"]).host
    authority.registry.set_host_meta(enrolled.id, low[0][1], "cli:test")
    authority.registry.close()
    for extra in ([], ["--output", str(tmp_path / "out.yml")]):
        result = CliRunner().invoke(meshagent, ["authority", "slo", "rules", "--dir", str(directory), *extra])
        assert result.exit_code == 0, result.stderr
        assert "warning: low-1" in result.stderr and "MeshagentSLOFastBurn" in result.stderr
    assert "# WARNING: low-1" in (tmp_path / "out.yml").read_text()


def _flat(
    host_id: str, port: int, failing_per_min: float, from_min: int, to_min: int
) -> list[dict[str, str]]:
    """Inbound responses on one port, 600 a minute from `from_min` to `to_min` (none before)."""
    base = f'direction="inbound",host_id="{host_id}",target_port="{port}",tls="true",client_id="c"'
    before = f"_x{from_min} " if from_min else ""
    grow = lambda per_min: f"{before}0+{per_min:g}x{to_min - from_min}"  # noqa: E731
    return [
        {
            "series": f'response_total{{{base},classification="success"}}',
            "values": grow(600 - failing_per_min),
        },
        {"series": f'response_total{{{base},classification="failure"}}', "values": grow(failing_per_min)},
    ]


def test_the_slo_window_sums_only_the_current_shape_s_history(tmp_path: Path) -> None:
    """Review 20b M2: the service moves from port 9999 to 8080 and its SLO (same name) follows.
    Shape A's rules recorded the 5 m rates for the first hour (50 % failures on 9999), then shape
    B's rules run (8080, 1 % failures): B's SLO-window ratio, the one budgets read, is B's
    traffic only (before the fix it summed both: ~26 %)."""
    a = Slo("availability", "availability", 99.0, port=9999)
    b = Slo("availability", "availability", 99.0, port=8080)
    h = host("h", "h-1")
    # shape A's recorded history, labelled as A's own rules label it, for the first hour
    history = []
    for r in rules([(h, HostMeta(slos=(a,)))])["groups"][0]["rules"]:
        if r.get("record") in (ERRORS_5M, REQUESTS_5M):
            per_s = 5 if r["record"] == ERRORS_5M else 10
            labels = ",".join(f'{k}="{v}"' for k, v in r["labels"].items())
            history.append({"series": f"{r['record']}{{{labels}}}", "values": f"{per_s}x60"})
    assert len(history) == 2
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules([(h, HostMeta(slos=(b,)))])))
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": history + _flat("h", 9999, 300, 0, 60) + _flat("h", 8080, 6, 60, 120),
                "promql_expr_test": [
                    {
                        "expr": 'round(1e6 * meshagent_slo:error_ratio:rate28d{host_id="h"})',
                        "eval_time": "120m",
                        # 1 % in parts per million; A's 50 % would pull it far up
                        "exp_samples": [
                            {"labels": f'{{host_id="h",slo="availability",spec="{spec(b)}"}}', "value": 10000}
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    ran = promtool("test", "rules", str(tmp_path / "test.yml"))
    assert ran.returncode == 0, ran.stdout + ran.stderr


def test_a_1d_or_3d_slo_window_is_recorded_once(tmp_path: Path) -> None:
    """Review 20b L1: the 1d and 3d windows are already recorded for the alerts; an SLO with
    such a window reads that record, not a second rule writing the same series."""
    slos = (
        Slo("day", "availability", 99.0, window_days=1),
        Slo("days", "latency", 99.0, threshold_ms=300, window_days=3),
    )
    path = tmp_path / "rules.yml"
    path.write_text(render_rules([(host("h", "h-1"), HostMeta(slos=slos))]))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "duplicate" not in (checked.stdout + checked.stderr).lower(), checked.stdout + checked.stderr
    # one rule per recorded name and SLO (a spec label would not make a second rate1d another
    # ratio: it is the same window over the same traffic, recorded twice)
    recorded = [
        (r["record"], r["labels"]["slo"])
        for g in rules([(host("h", "h-1"), HostMeta(slos=slos))])["groups"]
        for r in g["rules"]
        if "record" in r
    ]
    assert len(recorded) == len(set(recorded)), recorded
    # per SLO: the windows' ratios and the marker (no 5 m parts: nothing sums them)
    assert f"SUCCESS: {2 * (len(WINDOWS) + 1 + len(ALERTS))} rules found" in checked.stdout
