"""HTTP client of the management node's ZStack-compatible API.

``POST /zstack/api`` with ``{"<fullName>": {...}}`` answers either
``{"state": "Done", "result": "<JSON string>"}`` or ``{"state": "Processing", "uuid": "<job>"}``;
a job is polled with ``GET /zstack/api/result/<job>`` (same shape) until it is Done.
The result is ``{"<fullName of reply or event>": {"success": ..., ...}}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

API_PATH = "/zstack/api"
RESULT_PATH = "/zstack/api/result/"
DEFAULT_WAIT = 1800.0  # seconds; ZStack's default API timeout is 30 minutes
POLL_FIRST = 0.05
POLL_MAX = 1.0
POLL_FACTOR = 1.5

# Error codes meaning "log in again". ID.1001 is ZStack's IdentityErrors.INVALID_SESSION.
SESSION_ERROR_CODES = frozenset({"SESSION_EXPIRED", "INVALID_SESSION", "ID.1001"})


class ClientError(Exception):
    """The call did not produce an API reply (unreachable server, bad answer, timeout)."""


class ConnectionFailed(ClientError):
    pass


class ProtocolError(ClientError):
    pass


class WaitTimeout(ClientError):
    pass


@dataclass
class Reply:
    name: str | None  # fullName of the reply or event, when the result had the usual shape
    body: dict[str, Any]  # the object under that name

    @property
    def success(self) -> bool:
        if "success" in self.body:
            return bool(self.body["success"])
        return "error" not in self.body

    @property
    def error(self) -> dict[str, Any] | None:
        err = self.body.get("error")
        return err if isinstance(err, dict) else None

    @property
    def is_session_error(self) -> bool:
        err = self.error
        if self.success or err is None:
            return False
        if str(err.get("code", "")) in SESSION_ERROR_CODES:
            return True
        text = f"{err.get('description', '')} {err.get('details', '')}".lower()
        return "session expired" in text or "invalid session" in text


def parse_result(result: Any) -> Reply:
    """The ``result`` member of a Done answer (a JSON string, or already an object)."""
    if isinstance(result, str):
        try:
            result = json.loads(result)
        except ValueError as e:
            raise ProtocolError(f"the result is not JSON: {e}: {result[:200]!r}") from None
    if isinstance(result, dict) and len(result) == 1:
        ((name, body),) = result.items()
        if isinstance(body, dict):
            return Reply(name=name, body=body)
    if isinstance(result, dict):
        return Reply(name=None, body=result)
    raise ProtocolError(f"unexpected result: {json.dumps(result)[:200]}")


def base_url(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"http://{host}:{port}"


class ApiClient:
    def __init__(
        self,
        host: str,
        port: int,
        wait: float = DEFAULT_WAIT,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.host = host
        self.port = port
        self.url = base_url(host, port)
        self.wait = wait
        self._sleep = sleep
        # told each new progress line of a job while it runs (AddImage's download, AddKVMHost's deployment)
        self.on_progress: Callable[[str], None] | None = None
        self._http = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(wait, connect=10.0),
            transport=transport,
            trust_env=False,  # the management node is addressed directly, never via a proxy
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            if method == "POST":
                return self._http.post(path, json=body)
            return self._http.get(path)
        except httpx.ConnectError as e:
            raise ConnectionFailed(
                f"cannot connect to the management node at {self.url} ({e}); is it running? "
                f"Choose another with --host/--port or NIMBOSTACK_HOST/NIMBOSTACK_PORT"
            ) from None
        except httpx.TimeoutException:
            raise WaitTimeout(f"{method} {self.url}{path}: no answer within {self.wait:g}s") from None
        except httpx.HTTPError as e:
            raise ClientError(f"{method} {self.url}{path} failed: {e}") from None

    @staticmethod
    def _decode(resp: httpx.Response) -> dict[str, Any]:
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or "state" not in answer:
            raise ProtocolError(
                f"HTTP {resp.status_code} from {resp.request.method} {resp.request.url.path}: "
                f"{resp.text.strip()[:300] or '(empty body)'}"
            )
        return answer

    def call(self, body: dict[str, Any]) -> Reply:
        """Send one API message and wait for its reply or event."""
        answer = self._decode(self._request("POST", API_PATH, body))
        deadline = time.monotonic() + self.wait
        delay = POLL_FIRST
        said = ""
        while True:
            state = answer.get("state")
            progress = answer.get("progress")
            if progress and progress != said and self.on_progress is not None:
                said = str(progress)
                self.on_progress(said)
            if state == "Done":
                return parse_result(answer.get("result"))
            if state != "Processing" or not answer.get("uuid"):
                raise ProtocolError(f"unexpected answer: {json.dumps(answer)[:300]}")
            job = str(answer["uuid"])
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"job {job} not done after {self.wait:g}s; its result stays at {self.url}{RESULT_PATH}{job}"
                )
            self._sleep(delay)
            delay = min(delay * POLL_FACTOR, POLL_MAX)
            answer = self._decode(self._request("GET", RESULT_PATH + job))
