"""Accounts and sessions. Passwords arrive as SHA-512 hex digests (the wire's rule) and are stored
as argon2 hashes of that digest."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid as uuidlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from sqlalchemy import delete, func, select

from nimbostack.core.errors import (
    INVALID_SESSION,
    PERMISSION_DENIED,
    SESSION_EXPIRED,
    WRONG_CREDENTIALS,
    ApiError,
)
from nimbostack.core.globalconfig import GlobalConfigStore
from nimbostack.db.engine import Database
from nimbostack.db.models import Account, Session

ADMIN_UUID = "36c27e8ff05c4780bf6d2fa65700f22e"  # ZStack's well-known admin account uuid
ADMIN_TYPE = "SystemAdmin"
_hasher = PasswordHasher()


@dataclass
class Caller:
    account_uuid: str
    is_admin: bool
    session_uuid: str | None = None


class Access(Protocol):
    """Who may call: an API's route, or a read-only HTTP endpoint beside the API."""

    public: bool  # no session needed (login)
    admin: bool  # admin accounts only


def hash_password(sha512_hex: str) -> str:
    return _hasher.hash(sha512_hex.lower())


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

    async def seed_admin(self) -> None:

        async with self.db.tx() as s:
            if await s.get(Account, ADMIN_UUID) is None:
                s.add(
                    Account(
                        uuid=ADMIN_UUID,
                        name="admin",
                        type=ADMIN_TYPE,
                        passwordHash=hash_password(hashlib.sha512(b"password").hexdigest()),
                    )
                )

    async def login(self, name: str, password_digest: str) -> Session:
        async with self.db.tx() as s:
            account = (await s.execute(select(Account).where(Account.name == name))).scalar_one_or_none()
        if account is None or not await verify_password(account.passwordHash, password_digest):
            raise ApiError(
                WRONG_CREDENTIALS,
                "Wrong account name or password",
                "the password must be sent as its SHA-512 hex digest",
            )
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
                    f"account {name} already holds {active} sessions (identity/session.maxConcurrent)",
                )
            session = Session(
                uuid=uuidlib.uuid4().hex,
                accountUuid=account.uuid,
                userUuid=account.uuid,
                expiredDate=now + timedelta(seconds=timeout),
                createDate=now,
            )
            s.add(session)
        return session

    async def logout(self, session_uuid: str) -> None:
        self._cache.pop(session_uuid, None)
        async with self.db.tx() as s:
            await s.execute(delete(Session).where(Session.uuid == session_uuid))

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
            row = await s.get(Session, sid)
            account = await s.get(Account, row.accountUuid) if row is not None else None
        if row is None or account is None:
            self._cache.pop(sid, None)
            raise ApiError(INVALID_SESSION, "Invalid session", f"session {sid} does not exist; log in again")
        if row.expiredDate < datetime.utcnow():
            raise ApiError(SESSION_EXPIRED, "The session expired", "log in again with LogInByAccount")
        caller = Caller(account.uuid, account.type == ADMIN_TYPE, sid)
        if len(self._cache) > 10000:
            self._cache.clear()
        self._cache[sid] = (now, caller, row.expiredDate)
        return caller
