// The console page: noVNC's RFB client on the management node's console WebSocket. The page's
// address carries the VM and its one-time token (RequestConsoleAccess); the token is spent when
// the socket opens, so a reload needs a new console URL.
import RFB from "./novnc/core/rfb.js";

const status = document.getElementById("status");
const params = new URLSearchParams(window.location.search);
const vm = params.get("vmInstanceUuid");
const token = params.get("token");

function show(state, text) {
    document.body.dataset.state = state;
    status.textContent = text;
}

if (!vm || !token) {
    show("failed", "This console URL is incomplete: ask RequestConsoleAccess for a new one.");
} else {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams({ vmInstanceUuid: vm, token: token });
    const url = `${scheme}//${window.location.host}/console/ws?${query}`;
    // the token is worth nothing once the socket is open: keep it out of the history too
    window.history.replaceState(null, "", `${window.location.pathname}?vmInstanceUuid=${encodeURIComponent(vm)}`);
    const rfb = new RFB(document.getElementById("screen"), url);
    rfb.scaleViewport = true;
    let connected = false;
    rfb.addEventListener("connect", () => {
        connected = true;
        show("connected", `VM ${vm}`);
    });
    rfb.addEventListener("desktopname", (e) => {
        document.title = `${e.detail.name} - nimbostack console`;
    });
    rfb.addEventListener("securityfailure", (e) => {
        show("failed", `The VM's console refused the connection: ${e.detail.reason || "no reason given"}`);
    });
    rfb.addEventListener("disconnect", () => {
        if (document.body.dataset.state === "failed") {
            return;
        }
        show("failed", connected
            ? "The console closed. Ask RequestConsoleAccess for a new console URL to reconnect."
            : "The console could not be opened: the URL was already used, has expired, or the VM is not running.");
    });
}
