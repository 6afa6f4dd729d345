"""The web UI on the management node's API server: the page at ``/``, its files (``/ui/static/``),
and the few endpoints the page uses besides the API itself.

The page is a client of the same ZStack API: ``POST /ui/api`` takes the wire's body, adds the
session of the page's cookie and hands it to the same dispatcher ``POST /zstack/api`` uses, so a
tenant's page sees only what the API lets that session see. The session token lives in an
HttpOnly, SameSite=Strict cookie the page's scripts cannot read; every state-changing request
from the page must carry the CSRF token (``X-CSRF-Token``, derived from the session, readable by
the page from its own cookie) and, when the browser sends one, the node's own Origin. The API's
session in the body still works for every other client.

``GET /ui/events`` is a stream of server-sent events from the node's event bus (core/events.py),
filtered to what the session may see: an admin's stream carries every event; another account's
only those about its own resources or made by its own calls."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from sqlalchemy import bindparam, select
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route

from nimbostack.api.console import StaticWithPolicy
from nimbostack.api.dispatch import Dispatcher
from nimbostack.core import spec
from nimbostack.core.auth import Caller
from nimbostack.core.context import Route as ApiRoute
from nimbostack.core.errors import INVALID_ARGUMENT, INVALID_SESSION, PERMISSION_DENIED, ApiError
from nimbostack.core.platform import Platform
from nimbostack.db.models import Account, AccountResourceRef
from nimbostack.web import UI

log = logging.getLogger(__name__)

SESSION_COOKIE = "nimbo_session"
CSRF_COOKIE = "nimbo_csrf"
CSRF_HEADER = "x-csrf-token"
# the page runs only the node's own files and talks only to the node: no inline script or style
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": POLICY,
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
HEARTBEAT = 15.0  # seconds between an idle stream's comments (proxies close silent streams)
OWNERS_CACHED = 10_000  # per stream: resources whose owner it has looked up
_OWNER = select(AccountResourceRef.accountUuid).where(AccountResourceRef.resourceUuid == bindparam("uuid"))
_LOGIN = spec.messages()["LogInByAccount"].full_name


async def _no_handler(_ctx: Any) -> dict[str, Any]:
    return {}


_ANY_SESSION = ApiRoute(_no_handler)


def csrf_token(session_token: str) -> str:
    """The page's CSRF token: bound to its session, so a token from another session is useless."""
    return hmac.new(session_token.encode(), b"nimbostack-ui-csrf", hashlib.sha256).hexdigest()[:32]


def _error(status: int, code: str, description: str, details: str) -> JSONResponse:
    body = {"success": False, "error": {"code": code, "description": description, "details": details}}
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


def _same_origin(request: Request) -> bool:
    """A browser names the page that sent a request in Origin; it must be the node's own."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser's cross-site request: those always carry Origin for POST
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def _refused(request: Request, need_csrf: bool = True) -> JSONResponse | None:
    if not _same_origin(request):
        return _error(403, PERMISSION_DENIED, "Cross-site request refused", "the Origin is not this node")
    if need_csrf:
        token = request.cookies.get(SESSION_COOKIE, "")
        sent = request.headers.get(CSRF_HEADER, "")
        if not token or not hmac.compare_digest(sent, csrf_token(token)):
            return _error(403, PERMISSION_DENIED, "CSRF token missing or wrong",
                          f"send the {CSRF_COOKIE} cookie's value in the X-CSRF-Token header")
    return None


class WebUi:
    def __init__(self, platform: Callable[[], Platform], dispatcher: Callable[[], Dispatcher]) -> None:
        self.platform, self.dispatcher = platform, dispatcher

    async def _caller(self, request: Request) -> tuple[str, Caller]:
        token = request.cookies.get(SESSION_COOKIE, "")
        if not token:
            raise ApiError(INVALID_SESSION, "A session is required", "log in on the web UI's login page")
        return token, await self.platform().auth.caller(token, _ANY_SESSION)

    async def page(self, _request: Request) -> Response:
        return FileResponse(UI / "index.html", headers=HEADERS, media_type="text/html")

    async def login(self, request: Request) -> Response:
        refused = _refused(request, need_csrf=False)
        if refused is not None:
            return refused
        try:
            given = json.loads(await request.body())
            name, password = str(given["accountName"]), str(given["password"])
        except (ValueError, KeyError, TypeError) as err:
            return _error(400, INVALID_ARGUMENT, "The body must be {accountName, password}", repr(err))
        # the wire's rule is a SHA-512 digest of the password; the page sends the password itself
        # (SubtleCrypto is missing on pages served over plain http from another address)
        digest = hashlib.sha512(password.encode()).hexdigest()
        client = request.client.host if request.client else ""
        answer = await self.dispatcher().handle({_LOGIN: {"accountName": name, "password": digest}}, client)
        ((_, reply),) = json.loads(answer["result"]).items()
        if not reply.get("success"):
            return JSONResponse(reply, status_code=401)
        token = reply["inventory"]["uuid"]
        caller = await self.platform().auth.caller(token, _ANY_SESSION)
        inventory = {k: v for k, v in reply["inventory"].items() if k != "uuid"}  # the token stays in the cookie
        response = JSONResponse({"success": True, "inventory": inventory, "isAdmin": caller.is_admin,
                                 "accountName": name})
        secure = request.url.scheme == "https"
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", secure=secure, path="/")
        response.set_cookie(CSRF_COOKIE, csrf_token(token), httponly=False, samesite="strict", secure=secure,
                            path="/")
        return response

    async def logout(self, request: Request) -> Response:
        refused = _refused(request)
        if refused is not None:
            return refused
        await self.platform().auth.logout(request.cookies[SESSION_COOKIE])
        response = JSONResponse({"success": True})
        response.delete_cookie(SESSION_COOKIE, path="/")
        response.delete_cookie(CSRF_COOKIE, path="/")
        return response

    async def whoami(self, request: Request) -> Response:
        """Who the page's cookie logs in, if anyone: a page opened anew asks before it shows the
        login form (an answer, not an error: no session is the usual case then)."""
        try:
            _token, caller = await self._caller(request)
        except ApiError as err:
            return JSONResponse({"success": False, "error": err.to_dict()}, headers={"Cache-Control": "no-store"})
        async with self.platform().db.tx() as s:
            account = await s.get(Account, caller.account_uuid)
        body = {"success": True, "accountUuid": caller.account_uuid, "isAdmin": caller.is_admin,
                "accountName": account.name if account is not None else ""}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def api(self, request: Request) -> Response:
        refused = _refused(request)
        if refused is not None:
            return refused
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as err:
            return _error(400, INVALID_ARGUMENT, "The body is not JSON", str(err))
        if not isinstance(body, dict) or len(body) != 1 or not isinstance(next(iter(body.values())), dict | None):
            return _error(400, INVALID_ARGUMENT, "The body is not one API message", '{"<message>": {fields...}}')
        ((name, params),) = body.items()
        # the page's session, never one the page names itself
        params = {**(params or {}), "session": {"uuid": request.cookies[SESSION_COOKIE]}}
        client = request.client.host if request.client else ""
        answer = await self.dispatcher().handle({name: params}, client)
        return JSONResponse(answer, headers={"Cache-Control": "no-store"})

    async def events(self, request: Request) -> Response:
        try:
            token, caller = await self._caller(request)
        except ApiError as err:
            return _error(401, err.code, err.description, err.details)
        return StreamingResponse(
            self._stream(token, caller),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", "X-Content-Type-Options": "nosniff"},
        )

    async def _stream(self, token: str, caller: Caller) -> AsyncIterator[str]:
        p = self.platform()
        owners: dict[str, str] = {}

        async def visible(event: dict[str, Any]) -> bool:
            if caller.is_admin or event.get("overflow") or event.get("account") == caller.account_uuid:
                return True
            uuid = event.get("uuid") or ""
            if not uuid:
                return False
            owner = owners.get(uuid)
            if owner is None:
                async with p.db.tx() as s:
                    owner = (await s.execute(_OWNER, {"uuid": uuid})).scalar()
                if owner is None:
                    return False  # not cached: a resource being created has its owner a moment later
                if len(owners) >= OWNERS_CACHED:
                    owners.clear()
                owners[uuid] = owner  # a resource's owner never changes
            return owner == caller.account_uuid

        with p.events.subscribe() as queue:
            yield "retry: 2000\n: connected\n\n"
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), HEARTBEAT)
                except TimeoutError:
                    try:  # a session logged out or expired ends its stream
                        await p.auth.caller(token, _ANY_SESSION)
                    except ApiError:
                        yield "event: session\ndata: {}\n\n"
                        return
                    yield ": ping\n\n"
                    continue
                if await visible(event):
                    public = {k: v for k, v in event.items() if k != "account"}
                    yield f"data: {json.dumps(public, separators=(',', ':'))}\n\n"


def routes(platform: Callable[[], Platform], dispatcher: Callable[[], Dispatcher]) -> list[BaseRoute]:
    ui = WebUi(platform, dispatcher)
    return [
        Route("/", ui.page, methods=["GET"]),
        Route("/ui/login", ui.login, methods=["POST"]),
        Route("/ui/logout", ui.logout, methods=["POST"]),
        Route("/ui/session", ui.whoami, methods=["GET"]),
        Route("/ui/api", ui.api, methods=["POST"]),
        Route("/ui/events", ui.events, methods=["GET"]),
        Mount("/ui/static", StaticWithPolicy(directory=UI)),
    ]
