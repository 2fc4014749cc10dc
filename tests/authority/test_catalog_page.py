"""The service catalog's page in a real browser (Debian's headless Chromium, driven by selenium),
served by a real `authority serve` on loopback, with a real Prometheus scraping a loopback
exporter of agent-format series (tests/authority/test_edges_and_budgets.py's `exposition`).

One browser session and one Prometheus for the module. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.authority import catalog_web
from agent.authority.catalog_web import RENDER_SLOTS
from agent.authority.prom_query import record_url
from tests.authority import promserver
from tests.authority.test_catalog_show import XSS_IMG, XSS_SCRIPT, Fleet, make_fleet
from tests.authority.test_edges_and_budgets import Flow, exposition
from tests.support import AuthorityProcess, free_port, run_cli, running_authority

pytestmark = pytest.mark.skipif(
    not (
        shutil.which("prometheus")
        and Path("/usr/bin/chromium").exists()
        and Path("/usr/bin/chromedriver").exists()
    ),
    reason="needs prometheus, chromium and chromium-driver (scripts/bootstrap)",
)

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TD_MESH = "serviceaccount.identity.linkerd.cluster.local"


def dns(ns: str, sa: str) -> str:
    return f"{sa}.{ns}.{TD_MESH}"


# The traffic (responses/s), as the agents of web-1 and db-1 would count it:
#   frontend (in-cluster) -> web-1   5/s, 0.05 % failures (half web-1's 99.9 % budget)
#   web-1 -> db-1                     4/s (both agents see it: one edge, db-1's view)
#   a plain-text client -> db-1       1/s (no identity: src "")
FLOWS = {
    "web-1": [
        Flow("inbound", dns("shop", "frontend"), 5.0, fail=0.0005),
        Flow("outbound", dns("shop", "db"), 4.0, port=5432),
    ],
    "db-1": [Flow("inbound", dns("shop", "web"), 4.0, port=5432), Flow("inbound", "", 1.0, port=5432)],
}


@contextlib.contextmanager
def prometheus(d: Path, fleet: Fleet) -> Iterator[str]:
    """A Prometheus scraping the exporter every second, each host a target with the labels the
    authority's discovery gives it (host_id, host, identity, ...)."""
    exporter = promserver.Exporter(lambda name, elapsed: exposition(FLOWS.get(name, []), elapsed))
    jobs = [
        {
            "job_name": f"meshagent-{name}",
            "metrics_path": f"/metrics/{name}",
            "static_configs": [
                {
                    "targets": [f"127.0.0.1:{exporter.port}"],
                    "labels": {"host_id": fleet.ids[name], "host": name, "identity": fleet.identities[name]},
                }
            ],
        }
        for name in FLOWS
    ]
    try:
        with promserver.prometheus(d, jobs) as url:
            # a few scrapes of every series, so rates exist
            promserver.wait_for(url, "min(count_over_time(response_total[1m])) >= 4", d)
            yield url
    finally:
        exporter.close()


@dataclass
class World:
    fleet: Fleet
    authority: AuthorityProcess
    token: str
    prometheus: str

    @property
    def url(self) -> str:
        return self.authority.url

    def cli_json(self, *args: str) -> dict[str, Any]:
        proc = run_cli(
            "authority", "catalog", "show", "--dir", str(self.fleet.directory),
            "--prometheus", self.prometheus, *args, "--json", check=True,
        )  # fmt: skip
        doc = json.loads(proc.stdout)
        assert isinstance(doc, dict)
        return doc


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("catalog-page")
    # db-1 at the address web-1's outbound series name (exposition's target_ip): a call to a host
    # is counted once, from the callee's inbound view.
    fleet = make_fleet(base / "authority", addresses={"db-1": "198.18.0.9"})
    token = (fleet.directory / "prometheus-token").read_text().strip()
    with prometheus(base, fleet) as prom_url, running_authority(fleet.directory) as authority:
        record_url(fleet.directory, prom_url)  # as `authority serve --prometheus URL` does
        yield World(fleet, authority, token, prom_url)


@pytest.fixture(scope="module")
def browser(world: World) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--ignore-certificate-errors", "--window-size=1280,1400"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(30)
    try:
        _log_in(driver, world)
        yield driver
    finally:
        driver.quit()


def _severe(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _log_in(driver: Any, world: World) -> None:
    """Through the form, as a person would: /catalog answers 401 with it."""
    from selenium.webdriver.common.by import By

    driver.get(f"{world.url}/catalog")
    assert driver.find_element(By.CSS_SELECTOR, "form[action='/catalog/login']")
    # The 401 itself is the one console error expected (Chromium logs the status).
    assert all("401" in e["message"] for e in _severe(driver))
    driver.find_element(By.ID, "token").send_keys(world.token)
    driver.find_element(By.CSS_SELECTOR, "form[action='/catalog/login'] button").click()
    _wait_for(driver, "hosts")
    assert driver.current_url == f"{world.url}/catalog"


def _wait_for(driver: Any, element_id: str) -> None:
    """After a click that navigates: the POST, a redirect and the load can outlast the click on a
    loaded 2-core machine, so wait for the next page's element, not chromedriver's heuristics."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    try:
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, element_id))
    except TimeoutException:
        pytest.fail(f"no #{element_id} after 30 s: at {driver.current_url}\n{driver.page_source[:2000]}")


def _shot(driver: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"catalog-{name}.png"))


def _no_injection(driver: Any) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - raises when no alert() ran
    assert driver.find_elements(By.TAG_NAME, "img") == []
    scripts = [s.get_attribute("src") for s in driver.find_elements(By.TAG_NAME, "script")]
    assert scripts == [f"{driver.current_url.split('/catalog')[0]}/catalog/static/catalog.js"]


def test_the_fleet_page_shows_the_hosts_and_the_graph_the_cli_shows(world: World, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{world.url}/catalog")
    assert _severe(browser) == []
    cli = world.cli_json()
    assert cli["prometheus_error"] is None
    rows = {
        r.get_attribute("data-host"): [td.text for td in r.find_elements(By.TAG_NAME, "td")]
        for r in browser.find_elements(By.CSS_SELECTOR, "#hosts tbody tr")
    }
    assert set(rows) == set(world.fleet.ids.values())
    web = rows[world.fleet.ids["web-1"]]
    assert web[:5] == ["web-1", "team-web", "1", "silent", "ok"]
    assert 45 < float(web[5].rstrip("%")) < 55  # 0.05 % failures against a 0.1 % budget
    assert "metadata_changed" in web[6]
    db = rows[world.fleet.ids["db-1"]]
    assert db[1] == XSS_IMG  # the text itself, not an element
    assert db[4:6] == ["ok", "100.0%"]  # no failures into db-1: its whole budget left

    nodes = {
        n.get_attribute("data-node"): n.get_attribute("data-hosts")
        for n in browser.find_elements(By.CSS_SELECTOR, "#graph g.node")
    }
    assert nodes == {n["identity"]: " ".join(n["hosts"]) for n in cli["nodes"]}
    drawn = sorted(
        (e.get_attribute("data-src"), e.get_attribute("data-dst"))
        for e in browser.find_elements(By.CSS_SELECTOR, "#graph g.edge")
    )
    assert drawn == sorted((e["src"], e["dst"]) for e in cli["edges"])
    assert drawn == sorted(
        [
            (dns("shop", "frontend"), dns("shop", "web")),
            (dns("shop", "web"), dns("shop", "db")),
            ("", dns("shop", "db")),
        ]
    )
    _no_injection(browser)
    _shot(browser, "fleet")
    assert _severe(browser) == []


def test_a_host_page_shows_its_card_budget_edges_and_changes(world: World, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    web_id = world.fleet.ids["web-1"]
    browser.get(f"{world.url}/catalog")
    browser.find_element(By.LINK_TEXT, "web-1").click()
    _wait_for(browser, "owner")
    assert browser.current_url == f"{world.url}/catalog/hosts/{web_id}"
    assert browser.find_element(By.ID, "owner").text == "team-web"
    assert browser.find_element(By.ID, "contact").text == "web-oncall@example.com"
    link = browser.find_element(By.CSS_SELECTOR, "#links a")
    assert (link.text, link.get_attribute("href")) == ("runbook", "https://runbooks.example.com/web")
    budget = browser.find_element(By.CSS_SELECTOR, "#budgets tr[data-slo='availability']")
    cells = [td.text for td in budget.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "availability: availability 99.9% over 28d (inbound)"
    assert 45 < float(cells[2].rstrip("%")) < 55 and cells[6] == "ok"
    card = world.cli_json("web-1")
    assert card["budgets"][0]["remaining"] == pytest.approx(0.5, abs=0.05)
    # The chart: the burn rate (about 0.5: half the allowed error ratio) from Prometheus.
    chart = browser.find_element(By.CSS_SELECTOR, "figure.chart[data-slo='availability'] polyline")
    assert len(chart.get_attribute("points").split()) >= 1
    edges_in = [
        r.get_attribute("data-src") for r in browser.find_elements(By.CSS_SELECTOR, "#edges-in tbody tr")
    ]
    assert edges_in == [e["src"] for e in card["edges_in"]] == [dns("shop", "frontend")]
    edges_out = [
        r.get_attribute("data-dst") for r in browser.find_elements(By.CSS_SELECTOR, "#edges-out tbody tr")
    ]
    assert edges_out == [e["dst"] for e in card["edges_out"]] == [dns("shop", "db")]
    kinds = [
        r.get_attribute("data-kind") for r in browser.find_elements(By.CSS_SELECTOR, "#changes tbody tr")
    ]
    assert kinds == [c["kind"] for c in card["changes"]] == ["metadata_changed", "enrolled"]
    _no_injection(browser)
    _shot(browser, "host")
    assert _severe(browser) == []


def test_html_in_metadata_is_shown_as_text_never_run(world: World, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{world.url}/catalog/hosts/{world.fleet.ids['db-1']}")
    assert browser.find_element(By.ID, "owner").text == XSS_IMG
    assert browser.find_element(By.ID, "contact").text == XSS_IMG
    assert browser.find_element(By.ID, "description").text == f"orders database {XSS_SCRIPT}"
    link = browser.find_element(By.CSS_SELECTOR, "#links a")
    assert (
        link.text == XSS_SCRIPT and link.get_attribute("href") == "https://example.com/?q=%22%3E%3Cscript%3E"
    )
    _no_injection(browser)
    _shot(browser, "html-as-text")
    assert _severe(browser) == []


def test_without_the_token_401(world: World) -> None:
    for path in (
        "/catalog",
        f"/catalog/hosts/{world.fleet.ids['web-1']}",
        "/v1/catalog",
        "/v1/catalog/hosts/x",
    ):
        for headers in (
            {},
            {"authorization": "Bearer not-the-token"},
            {"cookie": "meshagent_catalog=forged"},
        ):
            r = httpx.get(f"{world.url}{path}", headers=headers, verify=world.authority.tls, timeout=10)
            assert r.status_code == 401, (path, headers, r.text)
            if path.startswith("/v1/"):
                assert r.json()["code"] == "unauthenticated"
            else:
                assert 'action="/catalog/login"' in r.text
                assert "team-web" not in r.text and "web-1" not in r.text  # nothing of the fleet
    wrong = httpx.post(
        f"{world.url}/catalog/login", data={"token": "nope"}, verify=world.authority.tls, timeout=10
    )
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    stuffed = httpx.post(
        f"{world.url}/catalog/login",
        content="&".join(f"f{i}=1" for i in range(50)),
        verify=world.authority.tls,
    )
    assert stuffed.status_code == 400 and "set-cookie" not in stuffed.headers
    # The refusals are counted by route, not per id a client makes up.
    metrics = httpx.get(
        f"{world.url}/metrics", headers={"authorization": f"Bearer {world.token}"}, verify=world.authority.tls
    ).text
    assert 'meshagent_authority_requests_total{path="/v1/catalog/hosts/{host_id}",status="401"} 3' in metrics
    assert "/v1/catalog/hosts/x" not in metrics


def test_the_login_cookie_and_the_headers(world: World) -> None:
    tls = world.authority.tls
    r = httpx.post(
        f"{world.url}/catalog/login",
        data={"token": world.token, "next": "https://elsewhere.example/"},
        verify=tls,
        timeout=10,
    )
    assert r.status_code == 303 and r.headers["location"] == "/catalog"  # never off-site
    cookie = r.headers["set-cookie"]
    attributes = {a.strip().lower() for a in cookie.split(";")}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= attributes
    assert world.token not in cookie  # a MAC of the token, not the token
    value = cookie.split(";")[0]
    page = httpx.get(f"{world.url}/catalog", headers={"cookie": value}, verify=tls, timeout=30)
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'self';")
    assert "'unsafe-inline'" not in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"


def test_a_session_ends_when_its_time_is_up_even_for_a_copied_cookie(world: World) -> None:
    tls = world.authority.tls

    def status(value: str) -> int:
        cookie = {"cookie": f"{catalog_web.COOKIE}={value}".encode("latin-1")}
        return httpx.get(f"{world.url}/catalog", headers=cookie, verify=tls, timeout=30).status_code

    now = int(time.time())
    assert status(catalog_web.session_value(world.token, now + 600)) == 200
    # Made with the right token, but ended a second ago: the browser would have dropped it, a
    # copy must not outlive it.
    assert status(catalog_web.session_value(world.token, now - 1)) == 401
    # A live session's end moved later by hand: its MAC no longer matches.
    _, mac = catalog_web.session_value(world.token, now + 600).split(".")
    assert status(f"{now + 10**6}.{mac}") == 401
    # A digit Python's isdigit() takes but int() does not (sent as latin-1): refused, not a 500.
    assert status("\u00b2" + f"{now + 600}.{mac}") == 401


def _steady(doc: dict[str, Any]) -> dict[str, Any]:
    """A document without what moves between two reads (rates, budgets): the rest must be equal."""
    out = {
        k: v
        for k, v in doc.items()
        if k not in ("budgets", "budget_remaining", "edges", "edges_in", "edges_out")
    }
    if "hosts" in out:
        out["hosts"] = [_steady(h) for h in out["hosts"]]
    for key in ("edges", "edges_in", "edges_out"):
        if key in doc:
            out[key] = sorted(
                (e["src"], e["dst"], e["src_host"] or "", e["dst_host"] or "") for e in doc[key]
            )
    return out


def test_the_json_api_is_the_cli_json(world: World) -> None:
    headers = {"authorization": f"Bearer {world.token}"}
    tls = world.authority.tls
    api = httpx.get(f"{world.url}/v1/catalog", headers=headers, verify=tls, timeout=30)
    assert api.status_code == 200 and api.headers["cache-control"] == "no-store"
    assert _steady(api.json()) == _steady(world.cli_json())
    db_id = world.fleet.ids["db-1"]
    card = httpx.get(f"{world.url}/v1/catalog/hosts/{db_id}", headers=headers, verify=tls, timeout=30)
    assert card.status_code == 200
    assert _steady(card.json()) == _steady(world.cli_json(db_id))
    assert _steady(card.json())["edges_in"] == [
        ("", dns("shop", "db"), "", db_id),
        (dns("shop", "web"), dns("shop", "db"), world.fleet.ids["web-1"], db_id),
    ]
    missing = httpx.get(f"{world.url}/v1/catalog/hosts/nope", headers=headers, verify=tls, timeout=30)
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    spec = httpx.get(f"{world.url}/v1/openapi.json", verify=tls, timeout=30).json()
    assert {"/v1/catalog", "/v1/catalog/hosts/{host_id}", "/catalog", "/catalog/login"} <= set(spec["paths"])


def test_prometheus_unreachable_the_page_says_so_and_shows_the_registry(world: World, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    dead = f"http://127.0.0.1:{free_port()}"
    record_url(world.fleet.directory, dead)  # read per request by the running authority
    try:
        browser.get(f"{world.url}/catalog")
        note = browser.find_element(By.ID, "prometheus-error").text
        assert f"Prometheus at {dead}" in note and "did not answer" in note
        names = [
            r.find_element(By.TAG_NAME, "td").text
            for r in browser.find_elements(By.CSS_SELECTOR, "#hosts tbody tr")
        ]
        assert sorted(names) == ["db-1", "legacy", "old-1", "web-1"]
        _shot(browser, "prometheus-down")
        browser.get(f"{world.url}/catalog/hosts/{world.fleet.ids['web-1']}")
        assert "did not answer" in browser.find_element(By.ID, "prometheus-error").text
        assert browser.find_element(By.ID, "owner").text == "team-web"
        budget = browser.find_element(By.CSS_SELECTOR, "#budgets tr[data-slo='availability']")
        assert budget.find_elements(By.TAG_NAME, "td")[-1].text == "unknown"
        assert _severe(browser) == []
    finally:
        record_url(world.fleet.directory, world.prometheus)


def test_the_page_without_prometheus_configured(world: World, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    (world.fleet.directory / "prometheus.url").unlink()
    try:
        browser.get(f"{world.url}/catalog")
        assert "no Prometheus configured" in browser.find_element(By.ID, "prometheus-error").text
        nodes = {
            n.get_attribute("data-node") for n in browser.find_elements(By.CSS_SELECTOR, "#graph g.node")
        }
        assert nodes == {world.fleet.identities[n] for n in ("web-1", "db-1", "legacy")}
        assert browser.find_elements(By.CSS_SELECTOR, "#graph g.edge") == []
        assert re.search(r"team-web", browser.find_element(By.ID, "hosts").text)
    finally:
        record_url(world.fleet.directory, world.prometheus)


class Hung:
    """A 'Prometheus' that accepts connections and never answers; counts how many are open."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.open = 0
        self.most = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.open += 1
                self.most = max(self.most, self.open)
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        with conn:
            while conn.recv(4096):
                pass
        with self.lock:
            self.open -= 1

    def close(self) -> None:
        self.sock.close()


def test_a_hung_prometheus_holds_few_of_the_registry_threads(world: World) -> None:
    """Catalog renders wait on Prometheus in the API's registry threads, which the hosts need
    too: at most RENDER_SLOTS of them at once, so the rest of the API keeps answering."""
    hung = Hung()
    record_url(world.fleet.directory, f"http://127.0.0.1:{hung.port}")
    headers = {"authorization": f"Bearer {world.token}"}
    done: list[int] = []

    def fetch() -> None:
        r = httpx.get(f"{world.url}/v1/catalog", headers=headers, verify=world.authority.tls, timeout=60)
        done.append(r.status_code)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while hung.open < RENDER_SLOTS:  # the first renders are waiting on the hung Prometheus
            assert time.monotonic() < deadline and not done, (hung.open, done)
            time.sleep(0.05)
        # Meanwhile the registry threads still serve the rest of the API.
        targets = httpx.get(
            f"{world.url}/v1/prometheus/targets", headers=headers, verify=world.authority.tls, timeout=30
        )
        assert targets.status_code == 200 and len(targets.json()) == 3
        assert done == []  # (answered while every render was still waiting)
        for t in threads:
            t.join()
        assert done == [200] * 6  # each said Prometheus did not answer, with the registry's facts
        assert hung.most == RENDER_SLOTS
    finally:
        hung.close()
        record_url(world.fleet.directory, world.prometheus)
