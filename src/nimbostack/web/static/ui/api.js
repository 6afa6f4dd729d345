// The ZStack API through the node's /ui/api: the session is the page's HttpOnly cookie, and every
// state-changing request carries the CSRF token from the page's own cookie.

export class ApiFailure extends Error {
  constructor(error) {
    super(`${error.code || ""} ${error.description || ""}`.trim());
    this.code = String(error.code || "");
    this.description = String(error.description || "");
    this.details = String(error.details || "");
  }
}

function csrf() {
  const found = document.cookie.split("; ").find((c) => c.startsWith("nimbo_csrf="));
  return found ? decodeURIComponent(found.slice("nimbo_csrf=".length)) : "";
}

async function post(path, body) {
  const r = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
    body: JSON.stringify(body),
  });
  let answer;
  try {
    answer = await r.json();
  } catch (err) {
    throw new ApiFailure({ code: `HTTP ${r.status}`, description: r.statusText, details: String(err) });
  }
  if (!r.ok && answer.error) throw new ApiFailure(answer.error);
  return answer;
}

let onSessionLost = () => {};
export function whenSessionLost(callback) {
  onSessionLost = callback;
}

const SESSION_ERRORS = new Set(["ID.1001", "SESSION_EXPIRED", "INVALID_SESSION"]);

// call("StartVmInstance", {uuid}, progress => ...): the reply or event's body; throws ApiFailure
export async function call(name, params = {}, onProgress = null) {
  let answer = await post("/ui/api", { [`API${name}Msg`]: params });
  let wait = 50;
  while (answer.state === "Processing") {
    if (onProgress && answer.progress) onProgress(answer.progress);
    await new Promise((resolve) => setTimeout(resolve, wait));
    wait = Math.min(wait * 1.5, 1000);
    const r = await fetch(`/zstack/api/result/${encodeURIComponent(answer.uuid)}`, { credentials: "same-origin" });
    answer = await r.json();
  }
  const result = typeof answer.result === "string" ? JSON.parse(answer.result) : answer.result;
  const reply = Object.values(result)[0];
  if (!reply.success) {
    const failure = new ApiFailure(reply.error || {});
    if (SESSION_ERRORS.has(failure.code)) onSessionLost();
    throw failure;
  }
  return reply;
}

export async function login(accountName, password) {
  return post("/ui/login", { accountName, password });
}

export async function logout() {
  return post("/ui/logout", {});
}

export async function whoami() {
  const r = await fetch("/ui/session", { credentials: "same-origin" });
  const answer = r.ok ? await r.json() : null;
  return answer && answer.success ? answer : null;
}
