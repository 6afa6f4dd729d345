"""Accounts and sessions. Passwords arrive as SHA-512 hex digests (the wire's rule) and are stored
as argon2 hashes of that digest, computed off the event loop. A session's token is given to the
client once, at login; the database keeps only its SHA-256 (``session_key``), so a copy of the
database opens no session. Failed logins are throttled per account name and per client address."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from sqlalchemy import delete, func, select

from nimbostack.core.errors import (
    INVALID_SESSION,
    LOGIN_THROTTLED,
    PERMISSION_DENIED,
    SESSION_EXPIRED,
    WRONG_CREDENTIALS,
    ApiError,
)
from nimbostack.core.globalconfig import GlobalConfigStore
from nimbostack.db.engine import Database
from nimbostack.db.models import Account, Session, User

ADMIN_UUID = "36c27e8ff05c4780bf6d2fa65700f22e"  # ZStack's well-known admin account uuid
ADMIN_TYPE = "SystemAdmin"
_hasher = PasswordHasher()


# the failure counts of client addresses share the table of account names, under this prefix
_ADDRESS = "\0address:"
# and those of users, as "<account name or uuid>/<user name>"
_USER = "\0user:"
# whom a login names: (its account, the stored password hash, the session's userUuid), or None
_Found = tuple[Account, str, str] | None


@dataclass
class Caller:
    account_uuid: str
    is_admin: bool
    session_uuid: str | None = None
    # a user's session (LogInByUser): it acts for its account, within what its policies allow
    user_uuid: str | None = None


class Access(Protocol):
    """Who may call: an API's route, or a read-only HTTP endpoint beside the API."""

    public: bool  # no session needed (login)
    admin: bool  # admin accounts only


async def hash_password(sha512_hex: str) -> str:
    # argon2 is deliberately slow (~85 ms): keep it off the event loop
    return await asyncio.to_thread(_hasher.hash, sha512_hex.lower())


def session_key(token: str) -> str:
    """What the database keeps of a session token: its SHA-256, cut to a uuid's 32 characters."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


async def verify_password(stored: str, sha512_hex: str) -> bool:
    try:
        # argon2 is deliberately slow: keep it off the event loop
        return await asyncio.to_thread(_hasher.verify, stored, sha512_hex.lower())
    except VerificationError:
        return False


class Auth:
    CACHE_SECONDS = 5.0  # other management nodes see a LogOut within this time

    def __init__(self, db: Database, config: GlobalConfigStore) -> None:
        self.db, self.config = db, config
        self._cache: dict[str, tuple[float, Caller, datetime]] = {}
        # per account name: (failures in a row, monotonic time of the last); kept in memory, per node
        self._failures: dict[str, tuple[int, float]] = {}

    async def seed_admin(self) -> None:

        async with self.db.tx() as s:
            if await s.get(Account, ADMIN_UUID) is None:
                s.add(
                    Account(
                        uuid=ADMIN_UUID,
                        name="admin",
                        type=ADMIN_TYPE,
                        passwordHash=await hash_password(hashlib.sha512(b"password").hexdigest()),
                    )
                )

    async def login(self, name: str, password_digest: str, source: str = "") -> tuple[str, Session]:
        """A new session of the account: (its token, its row, whose uuid is the token's key).
        ``source``: the client's address (its failures are counted too)."""

        async def find() -> _Found:
            async with self.db.tx() as s:
                account = (await s.execute(select(Account).where(Account.name == name))).scalar_one_or_none()
            return (account, account.passwordHash, account.uuid) if account is not None else None

        return await self._login(name, find, password_digest, source, "Wrong account name or password")

    async def login_user(
        self, account_name: str | None, account_uuid: str | None, user_name: str, password_digest: str, source: str = ""
    ) -> tuple[str, Session]:
        """A new session of a user of an account named by its name or its uuid. Its failures are
        counted like an account's, under the account and user names, and per client address."""

        async def find() -> _Found:
            async with self.db.tx() as s:
                where = Account.uuid == account_uuid if account_uuid else Account.name == account_name
                account = (await s.execute(select(Account).where(where))).scalar_one_or_none()
                if account is None:
                    return None
                user = (
                    await s.execute(select(User).where(User.accountUuid == account.uuid, User.name == user_name))
                ).scalar_one_or_none()
            return (account, user.passwordHash, user.uuid) if user is not None else None

        who = f"{account_uuid or account_name}/{user_name}"
        return await self._login(
            _USER + who, find, password_digest, source, "Wrong account, user name or password"
        )

    async def _login(
        self,
        key: str,
        find: Callable[[], Awaitable[_Found]],
        password_digest: str,
        source: str,
        wrong: str,
    ) -> tuple[str, Session]:
        """The login of whoever ``find`` names, its failures counted under ``key``."""
        await self._check_throttle(key)
        if source:
            await self._check_throttle(_ADDRESS + source, "login.maxFailuresPerAddress")
        found = await find()
        if found is None or not await verify_password(found[1], password_digest):
            self._failed(key)
            if source:
                # not forgotten at a success: a guesser with one account of its own must not
                # reset its address's count by logging in between guesses
                self._failed(_ADDRESS + source)
            raise ApiError(WRONG_CREDENTIALS, wrong, "the password must be sent as its SHA-512 hex digest")
        self._failures.pop(key, None)
        account, _, user_uuid = found
        timeout = await self.config.get("identity", "session.timeout")
        limit = await self.config.get("identity", "session.maxConcurrent")
        now = datetime.utcnow()
        async with self.db.tx() as s:
            await s.execute(delete(Session).where(Session.expiredDate < now))
            active = (
                await s.execute(select(func.count()).select_from(Session).where(Session.accountUuid == account.uuid))
            ).scalar_one()
            if active >= limit:
                raise ApiError(
                    PERMISSION_DENIED,
                    "Too many sessions",
                    f"account {account.name} already holds {active} sessions (identity/session.maxConcurrent)",
                )
            token = uuidlib.uuid4().hex
            session = Session(
                uuid=session_key(token),
                accountUuid=account.uuid,
                userUuid=user_uuid,
                expiredDate=now + timedelta(seconds=timeout),
                createDate=now,
            )
            s.add(session)
        return token, session

    async def _check_throttle(self, name: str, limit_config: str = "login.maxFailures") -> None:
        """After ``identity/login.maxFailures`` wrong passwords in a row, the account's logins are
        refused for ``identity/login.lockSeconds`` after the last one, then allowed again: a guesser
        gets a handful of tries a minute, and the real user is never locked out for good. The same
        for a client address (``name`` then starts with _ADDRESS), whatever account it tries."""
        failed = self._failures.get(name)
        if failed is None:
            return
        count, last = failed
        limit = await self.config.get("identity", limit_config)
        lock = await self.config.get("identity", "login.lockSeconds")
        wait = last + lock - time.monotonic()
        if wait <= 0:
            self._failures.pop(name, None)
            return
        if count >= limit:
            if name.startswith(_ADDRESS):
                who = f"from address {name.removeprefix(_ADDRESS)}"
            elif name.startswith(_USER):
                who = f"for user {name.removeprefix(_USER)}"
            else:
                who = f"for account {name}"
            raise ApiError(
                LOGIN_THROTTLED,
                "Too many failed logins",
                f"{count} wrong passwords {who}; try again in {wait:.0f} s "
                f"(identity/{limit_config}, identity/login.lockSeconds)",
            )

    def _failed(self, name: str) -> None:
        if len(self._failures) > 100_000:  # names guessed at random must not grow this without end
            self._failures.clear()
        count = self._failures.get(name, (0, 0.0))[0]
        self._failures[name] = (count + 1, time.monotonic())

    def forget_users(self, user_uuids: list[str]) -> None:
        """Deleted users' sessions end at once on this node (other nodes: within CACHE_SECONDS)."""
        gone = set(user_uuids)
        for sid in [sid for sid, (_, c, _) in self._cache.items() if c.user_uuid in gone]:
            self._cache.pop(sid, None)

    async def logout(self, token: str) -> None:
        self._cache.pop(token, None)
        async with self.db.tx() as s:
            await s.execute(delete(Session).where(Session.uuid == session_key(token)))

    async def caller(self, session: Any, route: Access) -> Caller:
        if route.public:
            return Caller(ADMIN_UUID, True)
        sid = session.get("uuid") if isinstance(session, dict) else session
        if not sid:
            raise ApiError(
                INVALID_SESSION,
                "A session is required",
                'log in with LogInByAccount and send {"session": {"uuid": ...}}',
            )
        caller = await self._lookup(str(sid))
        if route.admin and not caller.is_admin:
            raise ApiError(PERMISSION_DENIED, "Permission denied", "only an admin account can call this API")
        return caller

    async def _lookup(self, sid: str) -> Caller:
        now = time.monotonic()
        hit = self._cache.get(sid)
        if hit is not None and now - hit[0] < self.CACHE_SECONDS:
            if hit[2] < datetime.utcnow():
                raise ApiError(SESSION_EXPIRED, "The session expired", "log in again with LogInByAccount")
            return hit[1]
        async with self.db.tx() as s:
            row = await s.get(Session, session_key(sid))
            account = await s.get(Account, row.accountUuid) if row is not None else None
        if row is None or account is None:
            self._cache.pop(sid, None)
            raise ApiError(INVALID_SESSION, "Invalid session", f"session {sid} does not exist; log in again")
        if row.expiredDate < datetime.utcnow():
            raise ApiError(SESSION_EXPIRED, "The session expired", "log in again with LogInByAccount")
        user = row.userUuid if row.userUuid != row.accountUuid else None
        caller = Caller(account.uuid, account.type == ADMIN_TYPE, sid, user)
        if len(self._cache) > 10000:
            self._cache.clear()
        self._cache[sid] = (now, caller, row.expiredDate)
        return caller


async def set_admin_password(db: Database, password: str) -> None:
    """The admin account's password, from outside the API (the installer's first password, or an
    operator who lost it): the account made if the node has not started yet; its sessions end."""
    stored = await hash_password(hashlib.sha512(password.encode()).hexdigest())
    async with db.tx() as s:
        account = await s.get(Account, ADMIN_UUID)
        if account is None:
            s.add(Account(uuid=ADMIN_UUID, name="admin", type=ADMIN_TYPE, passwordHash=stored))
        else:
            account.passwordHash = stored
            await s.execute(delete(Session).where(Session.accountUuid == ADMIN_UUID))
