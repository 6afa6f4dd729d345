"""Logins and sessions against a guesser and a stolen database (issue 12, items 6 and 7): failed
logins pause an account for a while, never for good; the database holds no usable session token;
argon2 runs off the event loop."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
from sqlalchemy import text

from nimbostack.core import auth
from tests.conftest import Api, Running

WRONG = "0" * 128


def _digest(pw: str) -> str:
    return hashlib.sha512(pw.encode()).hexdigest()


def test_wrong_passwords_pause_the_account_then_it_logs_in_again(node: Running, api: Api) -> None:
    api.call("UpdateGlobalConfig", category="identity", name="login.maxFailures", value="3")
    api.call("UpdateGlobalConfig", category="identity", name="login.lockSeconds", value="2")
    api.call("CreateAccount", name="bob", password=_digest("right"))
    guesser = Api(node.url)
    for _ in range(3):
        assert guesser.raw("LogInByAccount", {"accountName": "bob", "password": WRONG})["error"]["code"] == "ID.1004"
    # paused: even the right password is refused now, with its own code, and no hash is checked
    paused = guesser.raw("LogInByAccount", {"accountName": "bob", "password": _digest("right")})["error"]
    assert paused["code"] == "ID.1005" and "bob" in paused["details"]
    # another account is not paused by bob's guesser
    Api(node.url).login()
    time.sleep(2.2)
    Api(node.url).login("bob", "right")
    # and a success starts the count afresh
    for _ in range(2):
        guesser.raw("LogInByAccount", {"accountName": "bob", "password": WRONG})
    Api(node.url).login("bob", "right")
    guesser.raw("LogInByAccount", {"accountName": "bob", "password": WRONG})
    Api(node.url).login("bob", "right")


def test_the_database_keeps_no_session_token(node: Running, api: Api) -> None:
    token = api.session
    assert token is not None

    async def stored() -> list[str]:
        async with node.platform.db.tx() as s:
            return list((await s.execute(text("SELECT uuid FROM session"))).scalars())

    keys = node.run(stored())
    assert token not in keys and auth.session_key(token) in keys
    # a key read out of the database is not a session
    assert Api(node.url).raw("QueryZone", {"session": {"uuid": keys[0]}}, session=False)["error"]["code"] == "ID.1001"
    # the token still works, and LogOut by token ends it
    assert api.call("ValidateSession", sessionUuid=token)["validSession"] is True
    api.call("LogOut", sessionUuid=token)
    assert Api(node.url).call("ValidateSession", sessionUuid=token)["validSession"] is False


def test_password_hashes_are_made_off_the_event_loop(node: Running, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    real = auth._hasher

    class Recording:
        def hash(self, secret: str) -> str:
            threads.append(threading.current_thread())
            return real.hash(secret)

        def verify(self, stored: str, secret: str) -> bool:
            threads.append(threading.current_thread())
            return real.verify(stored, secret)

    monkeypatch.setattr(auth, "_hasher", Recording())
    account = api.call("CreateAccount", name="carol", password=_digest("a"))["inventory"]
    carol = Api(node.url)
    carol.login("carol", "a")
    carol.call("UpdateAccount", uuid=account["uuid"], password=_digest("b"))
    assert len(threads) == 3 and node.thread not in threads


def test_the_data_dir_and_database_are_the_nodes_alone(node: Running) -> None:
    data_dir = node.platform.settings.data_dir
    assert data_dir.stat().st_mode & 0o777 == 0o700
    if node.db_url is None:  # the SQLite file, with its log files
        for name in ("nimbostack.db", "nimbostack.db-wal"):
            assert (data_dir / name).stat().st_mode & 0o777 == 0o600, name


def test_a_guesser_spraying_account_names_from_one_address_is_paused_there_only(node: Running, api: Api) -> None:
    import httpx

    api.call("UpdateGlobalConfig", category="identity", name="login.maxFailuresPerAddress", value="4")
    api.call("UpdateGlobalConfig", category="identity", name="login.lockSeconds", value="2")
    api.call("CreateAccount", name="mallory", password=_digest("own"))
    guesser = Api(node.url)
    guesser.http = httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    # one wrong password for each of four names: no account reaches its own limit (5) ...
    for name in ("admin", "bob", "carol", "dave"):
        assert guesser.raw("LogInByAccount", {"accountName": name, "password": WRONG})["error"]["code"] == "ID.1004"
    # ... but the address has: even a right password from there is refused, for a while
    paused = guesser.raw("LogInByAccount", {"accountName": "mallory", "password": _digest("own")})["error"]
    assert paused["code"] == "ID.1005" and "127.0.0.2" in paused["details"], paused
    # another address logs in to the same accounts at once
    other = Api(node.url)
    other.http = httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.3"))
    other.login()
    time.sleep(2.2)
    # after the pause the address may try again; its own success does not wipe its count
    guesser.login("mallory", "own")
    for name in ("erin", "frank", "grace"):
        guesser.raw("LogInByAccount", {"accountName": name, "password": WRONG})
    guesser.login("mallory", "own")
    guesser.raw("LogInByAccount", {"accountName": "heidi", "password": WRONG})
    assert guesser.raw("LogInByAccount", {"accountName": "mallory", "password": _digest("own")})["error"]["code"] == (
        "ID.1005"
    )
