"""The console in a real browser: Debian's Chromium driven by Playwright.

One daemon (``smtp-bridge serve --sandbox``, queue mode, admin on an ephemeral
loopback port) and one browser serve the whole module. Chromium is launched so
it cannot reach another host even by itself (its start-up calls home): every
connection goes to a loopback proxy port that is bound but never listens, names
resolve to nothing but 127.0.0.1, and every page request for another host is
blocked and recorded; each test ends by asserting there was none.

Where no browser launches the tests skip with the reason, except under CI=true,
where they fail. ``SMTP_BRIDGE_SCREENSHOTS=docs/screenshots`` also refreshes the
README's screenshots.
"""

from __future__ import annotations

import json
import os
import smtplib
import socket
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from proc_daemon import Daemon

WAIT = 15.0
CHROMIUM = "/usr/bin/chromium"
HOSTILE = "<img src=x onerror=alert(1)>"
ROOT = Path(__file__).resolve().parent.parent


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"no browser in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("console")
    config = tmp / "config.yaml"
    config.write_text(
        textwrap.dedent(f"""\
            smtp: {{listen: ["127.0.0.1:0"], hostname: bridge.test}}
            delivery: {{mode: queue, backoff: [50ms], state_dir: {json.dumps(str(tmp / "s"))}}}
            admin: {{listen: "127.0.0.1:0"}}
            routes:
              - name: shop
                template_id: "E_SHOP"
                data: {{subject: "{{{{ subject }}}}", name: "{{{{ rcpt.local }}}}"}}
            """)
    )
    d = Daemon("serve", "--sandbox", "--config", str(config))
    try:
        smtp = d.line("smtp-bridge sandbox: send mail to ").rsplit(" ", 1)[1]
        console = d.line("smtp-bridge console: ").split()[2]
        sandbox = d.event("sandbox_started")["url"]
        host, port = smtp.rsplit(":", 1)
        yield {
            "smtp": (host, int(port)),
            "console": console.rstrip("/"),
            "sandbox": "{0.scheme}://{0.netloc}".format(urlsplit(sandbox)),
            "proc": d,
        }
    finally:
        d.stop()


def send(daemon: dict[str, Any], subject: str, rcpt: str = "bob@example.org") -> str:
    """One message over SMTP; its queue id."""
    host, port = daemon["smtp"]
    body = (
        f"From: Shop <shop@example.com>\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{time.time_ns()}@shop.example>\r\n\r\nThanks.\r\n"
    )
    with smtplib.SMTP(host, port, timeout=WAIT) as client:
        code, text = client.ehlo()
        assert code == 250
        client.mail("shop@example.com")
        client.rcpt(rcpt)
        code, reply = client.data(body.encode())
    assert code == 250, reply
    return reply.decode().rsplit(" id=", 1)[1]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _unavailable(f"playwright is not installed: {exc}")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    # A loopback port that is bound but never listens: every proxied connection fails.
    dead_end = socket.socket()
    dead_end.bind(("127.0.0.1", 0))
    args = [
        f"--proxy-server=127.0.0.1:{dead_end.getsockname()[1]}",
        "--proxy-bypass-list=127.0.0.1",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
    ]  # fmt: skip
    try:
        with sync_playwright() as playwright:
            try:
                chromium = playwright.chromium.launch(
                    executable_path=CHROMIUM, headless=True, args=args, timeout=30_000
                )
            except Exception as exc:
                _unavailable(f"chromium did not launch: {str(exc).splitlines()[0]}")
            try:
                yield chromium
            finally:
                chromium.close()
    finally:
        dead_end.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page; fails the test if any request went for another host, or a dialog
    opened (a script of the mail's making ran)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    outside: list[str] = []
    dialogs: list[str] = []

    def only_loopback(route: Any) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_loopback)
    context.on(
        "request", lambda r: urlsplit(r.url).hostname != "127.0.0.1" and outside.append(r.url)
    )
    tab = context.new_page()
    tab.set_default_timeout(WAIT * 1000)

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    tab.on("dialog", on_dialog)
    tab.outside = outside
    tab.dialogs = dialogs
    yield tab
    context.close()
    assert outside == [], f"requests for other hosts: {outside}"
    assert dialogs == [], f"dialogs opened: {dialogs}"


def reload_until(page: Any, url: str, found: Callable[[], bool]) -> None:
    """Load ``url`` again until ``found()``: the history is written behind the reply."""
    deadline = time.monotonic() + WAIT
    while True:
        page.goto(url)
        if found():
            return
        assert time.monotonic() < deadline, f"not found on {url}: {page.content()[:2000]}"
        page.wait_for_timeout(100)


def shot(page: Any, name: str, tmp_path: Path) -> None:
    where = os.environ.get("SMTP_BRIDGE_SCREENSHOTS")
    folder = (ROOT / where) if where else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def test_a_sent_message_appears_with_its_outcome(
    daemon: dict[str, Any], page: Any, tmp_path: Path
) -> None:
    queue_id = send(daemon, "Your order #1042 has shipped")
    console = daemon["console"]
    row = page.locator("table.messages tr", has_text=queue_id)
    reload_until(page, console + "/", lambda: row.count() == 1 and "delivered" in row.inner_text())
    assert "bob@example.org" in row.inner_text()
    assert "shop" in row.inner_text() and "E_SHOP" in row.inner_text()
    shot(page, "console", tmp_path)

    row.get_by_role("link", name=queue_id).click()
    page.wait_for_url(f"**/messages/{queue_id}")
    text = page.locator("main").inner_text()
    assert "delivered" in text and "code 200" in text
    assert '"app_key": "***"' in text  # the request as sent, key hidden
    assert f"id={queue_id}" in text  # the reply the client got
    shot(page, "message", tmp_path)

    page.goto(console + "/sandbox")
    assert "E_SHOP" in page.locator("main").inner_text()
    shot(page, "sandbox", tmp_path)


def test_the_hostile_subject_stays_text(daemon: dict[str, Any], page: Any) -> None:
    queue_id = send(daemon, HOSTILE)
    console = daemon["console"]
    row = page.locator("table.messages tr", has_text=queue_id)
    reload_until(page, console + "/", lambda: row.count() == 1)
    assert row.locator("td.subject").inner_text() == HOSTILE  # shown as text
    assert page.locator("img").count() == 0  # never an element
    page.goto(f"{console}/messages/{queue_id}")
    assert page.locator("dd.subject").inner_text() == HOSTILE
    assert page.locator("img").count() == 0
    # The search box carries the query back, escaped too.
    page.goto(console + "/?q=" + httpx.QueryParams({"": HOSTILE}).get(""))
    page.fill("input[name=q]", HOSTILE)
    page.press("input[name=q]", "Enter")
    page.wait_for_load_state()
    assert page.locator("img").count() == 0
    assert page.locator("table.messages tr", has_text=queue_id).count() == 1


def test_retry_of_a_dead_letter(daemon: dict[str, Any], page: Any, tmp_path: Path) -> None:
    sandbox = daemon["sandbox"]
    httpx.post(
        sandbox + "/_script", json={"code": 40005, "to": "dead@example.org"}
    ).raise_for_status()
    queue_id = send(daemon, "Will bounce once", rcpt="dead@example.org")
    console = daemon["console"]
    row = page.locator("#dead ~ form tr", has_text=queue_id)
    reload_until(page, console + "/queue", lambda: row.count() == 1)
    assert "dead" in row.inner_text() and "550 5.1.3" in row.inner_text()
    shot(page, "queue", tmp_path)

    row.get_by_role("checkbox").check()
    row.locator("xpath=ancestor::form").get_by_role("button", name="Retry selected").click()
    page.wait_for_url("**/queue?done=*")
    assert "1 recipients due for delivery now" in page.locator(".notice").inner_text()

    detail = f"{console}/messages/{queue_id}"
    reload_until(page, detail, lambda: "code 200" in page.locator("main").inner_text())
    text = page.locator("main").inner_text()
    assert "code 40005" in text  # the first attempt, and ...
    assert text.count("API answer:") == 2  # ... the retry that delivered


def test_try_a_message(daemon: dict[str, Any], page: Any, tmp_path: Path) -> None:
    page.goto(daemon["console"] + "/try")
    page.fill(
        "textarea[name=eml]",
        "From: Shop <shop@example.com>\nTo: ann@example.org\nSubject: Hello\n\nHi.\n",
    )
    page.get_by_role("button", name="Show what would happen").click()
    page.wait_for_load_state()
    text = page.locator("main").inner_text()
    assert "ann@example.org" in text and "E_SHOP" in text and '"app_key": "***"' in text
    shot(page, "try", tmp_path)
