"""The web UI's shipped files (issue 15): every catalog has every key any other has and every key
the page uses; no script puts data on the page as HTML; the UI's responses carry the policy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

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


def used_keys() -> set[str]:
    """Every catalog key the UI's files refer to: literal t() calls, the page's data-i18n, and the
    keys the resource table implies (its pages, groups, actions, columns and form fields)."""
    keys = {k for text in SCRIPTS.values() for k in _T_CALL.findall(text)}
    keys |= {f"f.{k}" for text in SCRIPTS.values() for k in _FIELD.findall(text)}
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


def test_the_key_check_catches_a_missing_key(tmp_path: Path) -> None:
    # the check above is not vacuous: a key used by a script and absent from a catalog is found
    assert "login.submit" in used_keys() and "res.vm" in used_keys() and "f.memorySize" in used_keys()


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


def _client() -> TestClient:
    app = Starlette(routes=web.routes(lambda: None, lambda: None))  # type: ignore[arg-type, return-value]
    return TestClient(app)


def test_the_ui_responses_carry_a_policy_that_allows_no_inline_script() -> None:
    client = _client()
    for path in ("/", "/ui/static/app.js", "/ui/static/i18n/zh_CN.json"):
        r = client.get(path)
        assert r.status_code == 200, path
        policy = r.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";") if " " in d.strip())
        assert directives["script-src"] == "'self'", path
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
        assert r.headers["x-content-type-options"] == "nosniff"
    assert _client().get("/").headers["x-frame-options"] == "DENY"


def test_a_state_changing_request_needs_the_csrf_token_and_the_nodes_origin() -> None:
    client = _client()
    client.cookies.set(web.SESSION_COOKIE, "a" * 32)
    # no token, a token of another session, a foreign Origin: refused before any API is asked
    assert client.post("/ui/api", json={"APIQueryZoneMsg": {}}).status_code == 403
    wrong = {web.CSRF_HEADER: web.csrf_token("b" * 32)}
    assert client.post("/ui/api", json={"APIQueryZoneMsg": {}}, headers=wrong).status_code == 403
    right = {web.CSRF_HEADER: web.csrf_token("a" * 32), "origin": "http://evil.example"}
    r = client.post("/ui/api", json={"APIQueryZoneMsg": {}}, headers=right)
    assert r.status_code == 403 and r.json()["error"]["description"] == "Cross-site request refused"
    assert client.post("/ui/login", json={}, headers={"origin": "http://evil.example"}).status_code == 403
    assert client.post("/ui/logout", json={}).status_code == 403
