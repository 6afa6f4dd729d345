"""The web UI's shipped files (issue 15): every catalog has every key any other has and every key
the page uses; no script puts data on the page as HTML; the UI's responses carry the policy."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from nimbostack.api import web
from nimbostack.web import UI

CATALOGS = {p.stem: json.loads(p.read_text()) for p in sorted((UI / "i18n").glob("*.json"))}
SCRIPTS = {p.name: p.read_text() for p in sorted(UI.glob("*.js"))}
RESOURCES = json.loads((UI / "resources.json").read_text())
# t("key") and t("key", {...}) with a literal key; data-i18n="key" in the page
_T_CALL = re.compile(r"""\bt\(\s*["']([\w.]+)["']""")
_DATA_I18N = re.compile(r"""data-i18n=["']([\w.]+)["']""")
# the fields of a form written out in a script (the VM wizard): { name: "imageUuid", ... }
_FIELD = re.compile(r"""\{\s*name:\s*["'](\w+)["']""")
# states the page translates (st.<state>): the inventories' states and statuses it shows
STATES = ("Running", "Stopped", "Starting", "Stopping", "Rebooting", "Migrating", "Destroyed", "Destroying",
          "Paused", "Unknown", "Created", "Enabled", "Disabled", "Connected", "Disconnected", "Connecting",
          "Ready", "Downloading", "Deleted", "Maintenance", "PreMaintenance")


def used_keys(scripts: dict[str, str] = SCRIPTS) -> set[str]:
    """Every catalog key the UI's files refer to: literal t() calls, the page's data-i18n, and the
    keys the resource table implies (its pages, groups, actions, columns and form fields)."""
    keys = {k for text in scripts.values() for k in _T_CALL.findall(text)}
    keys |= {f"f.{k}" for text in scripts.values() for k in _FIELD.findall(text)}
    keys |= set(_DATA_I18N.findall((UI / "index.html").read_text()))
    for name, r in RESOURCES.items():
        keys |= {f"res.{name}", f"group.{r['group']}"}
        keys |= {f"f.{c}" for c in r["columns"]}
        for field in (r.get("create") or {}).get("fields", []):
            keys.add(f"f.{field['name']}")
        for action in r.get("actions", []):
            keys.add(f"act.{action['id']}")
            keys |= {f"f.{f['name']}" for f in action.get("fields", [])}
    keys |= {f"st.{s}" for s in STATES}
    return keys


def test_the_three_catalogs_ship() -> None:
    assert set(CATALOGS) == {"en", "zh_CN", "zh_TW"}


@pytest.mark.parametrize("lang", ["en", "zh_CN", "zh_TW"])
def test_a_catalog_has_every_key_another_has_and_the_ui_uses(lang: str) -> None:
    everyone = set().union(*(set(c) for c in CATALOGS.values()))
    missing = (everyone | used_keys()) - set(CATALOGS[lang])
    assert not missing, f"{lang}.json lacks {sorted(missing)}"
    empty = [k for k, v in CATALOGS[lang].items() if not isinstance(v, str) or not v.strip()]
    assert not empty, f"{lang}.json has empty entries {empty}"


def test_placeholders_agree_across_catalogs() -> None:
    def holes(text: str) -> set[str]:
        return set(re.findall(r"\{(\w+)\}", text))

    for key, text in CATALOGS["en"].items():
        for lang in ("zh_CN", "zh_TW"):
            assert holes(CATALOGS[lang][key]) == holes(text), f"{lang} {key}"


def test_the_chinese_catalogs_are_translations() -> None:
    # a catalog copied from English would pass the key check; most of the words must differ
    for lang in ("zh_CN", "zh_TW"):
        same = [k for k, v in CATALOGS[lang].items() if v == CATALOGS["en"][k]]
        assert len(same) < len(CATALOGS["en"]) // 10, f"{lang} is mostly English: {same[:20]}"
    differ = [k for k, v in CATALOGS["zh_TW"].items() if v != CATALOGS["zh_CN"][k]]
    assert len(differ) > 20, "zh_TW is zh_CN copied"


def test_the_key_check_catches_a_missing_key() -> None:
    # the check above is not vacuous: a label a script would show and no catalog has is found
    assert {"login.submit", "res.vm", "f.memorySize", "f.imageUuid"} <= used_keys()
    added = {**SCRIPTS, "new.js": 'h("p", {}, t("page.newLabel")); ask([{ name: "newField" }]);'}
    assert used_keys(added) - set(CATALOGS["en"]) == {"page.newLabel", "f.newField"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_no_script_writes_html(name: str) -> None:
    text = SCRIPTS[name]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in text, f"{name} uses {sink}"
    # no inline style attribute either: the policy would refuse it
    assert 'setAttribute("style"' not in text


def test_the_page_loads_no_inline_script_or_outside_file() -> None:
    page = (UI / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.S)
    assert scripts and all('src="/ui/static/' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page)
    assert " on" not in re.sub(r"<script.*?</script>", "", page, flags=re.S).lower().split("<body", 1)[1].split(">")[0]


def _requests(*calls: tuple[str, str, dict[str, Any]], cookies: dict[str, str] | None = None) -> list[httpx.Response]:
    """The UI's routes alone (no node behind them): what they answer before any API is asked."""
    app = Starlette(routes=web.routes(lambda: None, lambda: None))  # type: ignore[arg-type, return-value]

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://node", cookies=cookies) as client:
            return [await client.request(method, path, **kw) for method, path, kw in calls]

    return asyncio.run(run())


def test_the_ui_responses_carry_a_policy_that_allows_no_inline_script() -> None:
    paths = ("/", "/ui/static/app.js", "/ui/static/i18n/zh_CN.json")
    for path, r in zip(paths, _requests(*(("GET", p, {}) for p in paths)), strict=True):
        assert r.status_code == 200, path
        policy = r.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";") if " " in d.strip())
        assert directives["script-src"] == "'self'", path
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
        assert r.headers["x-content-type-options"] == "nosniff"
        if path == "/":
            assert r.headers["x-frame-options"] == "DENY"


def test_a_state_changing_request_needs_the_csrf_token_and_the_nodes_origin() -> None:
    body = {"json": {"APIQueryZoneMsg": {}}}
    # no token, a token of another session, a foreign Origin: refused before any API is asked
    none, other, foreign, login, logout = _requests(
        ("POST", "/ui/api", body),
        ("POST", "/ui/api", {**body, "headers": {web.CSRF_HEADER: web.csrf_token("b" * 32)}}),
        ("POST", "/ui/api", {**body, "headers": {web.CSRF_HEADER: web.csrf_token("a" * 32),
                                                 "origin": "http://evil.example"}}),
        ("POST", "/ui/login", {"json": {}, "headers": {"origin": "http://evil.example"}}),
        ("POST", "/ui/logout", {"json": {}}),
        cookies={web.SESSION_COOKIE: "a" * 32},
    )
    assert none.status_code == other.status_code == login.status_code == logout.status_code == 403
    assert foreign.status_code == 403 and foreign.json()["error"]["description"] == "Cross-site request refused"
    assert none.json()["error"]["code"] == "ID.1003"
