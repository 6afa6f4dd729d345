"""Error codes of the API. Codes are stable strings that clients may match on."""

from __future__ import annotations

from typing import Any

INVALID_ARGUMENT = "SYS.1007"
UNKNOWN_API = "SYS.1008"
RESOURCE_NOT_FOUND = "SYS.1006"
OPERATION_NOT_ALLOWED = "SYS.1005"
INTERNAL = "SYS.1000"
TIMEOUT = "SYS.1003"
INVALID_SESSION = "ID.1001"
SESSION_EXPIRED = "ID.1002"
PERMISSION_DENIED = "ID.1003"
WRONG_CREDENTIALS = "ID.1004"
LOGIN_THROTTLED = "ID.1005"
# a creation would take a normal account past one of its quotas (QueryQuota, UpdateQuota)
QUOTA_EXCEEDED = "ID.1006"
ALLOCATION_FAILED = "HOST_ALLOCATION.1001"
IP_ALLOCATION_FAILED = "L3.1001"
STORAGE_ALLOCATION_FAILED = "PS.1001"
AGENT_ERROR = "HOST.1001"
HOST_DISCONNECTED = "HOST.1002"
# deploying a KVM host's agent over SSH failed at one of its tasks (compute/deploy.py)
HOST_DEPLOY_FAILED = "HOST.1003"
MANAGEMENT_RESTARTED = "SYS.1010"
# the management node's database refused a write for want of disk space: nothing of the call was
# kept, and the same call succeeds once space is freed (no restart needed)
MANAGEMENT_STORAGE_FULL = "SYS.1011"
# the browser console proxies VNC only: a VM started with kvm vm.consoleMode=spice has none
CONSOLE_NEEDS_VNC = "CONSOLE.1001"
# a console token that is unknown, used, expired or for another VM
CONSOLE_TOKEN_REFUSED = "CONSOLE.1002"


class ApiError(Exception):
    """An error the API reports to the caller as ``{"code", "description", "details"}``."""

    def __init__(self, code: str, description: str, details: str = "") -> None:
        super().__init__(f"[{code}] {description}{': ' + details if details else ''}")
        self.code = code
        self.description = description
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "description": self.description, "details": self.details}


def invalid(details: str) -> ApiError:
    return ApiError(INVALID_ARGUMENT, "One or more API arguments are invalid", details)


def not_found(kind: str, uuid: str) -> ApiError:
    return ApiError(RESOURCE_NOT_FOUND, "Unable to find the resource", f"{kind}[uuid:{uuid}] does not exist")


def storage_full(details: str) -> ApiError:
    return ApiError(
        MANAGEMENT_STORAGE_FULL,
        "The storage of the management node's database is full",
        f"{details}; the call was rolled back: free disk space, then call again",
    )


def not_allowed(details: str) -> ApiError:
    return ApiError(OPERATION_NOT_ALLOWED, "The operation is not allowed in the current state", details)
