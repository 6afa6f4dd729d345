// nimbostack's web UI: a client of the node's ZStack API. One generic resource page (list, detail,
// create, delete, actions) is driven by resources.json; the dashboard and the VM wizard are the
// only pages of their own. Every value is put on the page as text (dom.js), never as HTML.

import { clear, fill, h } from "./dom.js";
import * as i18n from "./i18n.js";
import { ApiFailure, call, login, logout, whenSessionLost, whoami } from "./api.js";

const { t } = i18n;
const root = document.getElementById("app");
const PAGE_SIZE = 20;
// pages a normal account has no use for: the API refuses their queries to it
const ADMIN_ONLY = new Set([
  "zone", "cluster", "host", "primaryStorage", "backupStorage", "globalConfig", "systemTag", "account", "ipRange",
]);
const SIZE_FIELDS = new Set([
  "memorySize", "size", "actualSize", "diskSize", "totalCapacity", "availableCapacity",
  "totalPhysicalCapacity", "availablePhysicalCapacity", "totalMemory", "availableMemory",
]);
const DATE_FIELDS = new Set(["createDate", "lastOpDate", "expiredDate"]);
const GROUPS = ["compute", "storage", "network", "infra", "system"];

const app = { me: null, resources: {}, view: null, events: null, live: false };

// ---- page frame ------------------------------------------------------------------------------

function languageSelect() {
  const select = h("select", { id: "language", "aria-label": t("app.language") },
    Object.entries(i18n.LANGUAGES).map(([code, name]) => h("option", { value: code, selected: code === i18n.language() }, name)));
  select.addEventListener("change", async () => {
    await i18n.setLanguage(select.value);
    route();
  });
  return select;
}

function frame(title, ...content) {
  const nav = h("nav", { id: "nav" },
    h("a", { href: "#/", class: "nav-item", dataset: { page: "dashboard" } }, t("nav.dashboard")),
    GROUPS.map((group) => {
      const items = Object.entries(app.resources)
        .filter(([key, r]) => r.group === group && !r.hidden && (app.me.isAdmin || !ADMIN_ONLY.has(key)))
        .map(([key]) => h("a", { href: `#/r/${key}`, class: "nav-item", dataset: { page: key } }, t(`res.${key}`)));
      return items.length ? h("div", { class: "nav-group" }, h("h3", {}, t(`group.${group}`)), items) : null;
    }));
  const header = h("header", {},
    h("a", { href: "#/", class: "brand" }, t("app.title")),
    h("span", { id: "live", class: app.live ? "live on" : "live", title: t("app.liveHint") },
      app.live ? t("app.live") : t("app.offline")),
    h("span", { class: "spacer" }),
    languageSelect(),
    h("span", { id: "me" }, app.me.accountName || ""),
    h("button", { id: "logout", type: "button", onclick: doLogout }, t("app.logout")));
  fill(root, header, h("div", { class: "body" }, nav,
    h("main", {}, h("h1", { id: "title" }, title), ...content)), h("div", { id: "jobs", "aria-live": "polite" }));
}

function setLive(on) {
  app.live = on;
  const badge = document.getElementById("live");
  if (badge) {
    badge.className = on ? "live on" : "live";
    badge.textContent = on ? t("app.live") : t("app.offline");
  }
}

// ---- errors and jobs -------------------------------------------------------------------------

function errorBox(err) {
  if (err instanceof ApiFailure) {
    return h("div", { class: "error", role: "alert", dataset: { code: err.code } },
      h("strong", { class: "code" }, err.code), " ", h("span", { class: "description" }, err.description),
      err.details ? h("div", { class: "details" }, err.details) : null);
  }
  return h("div", { class: "error", role: "alert" }, String(err && err.message ? err.message : err));
}

// a long API call as an entry of the jobs panel: its progress while it runs, then done or the error
async function job(label, name, params) {
  const status = h("span", { class: "job-status" }, t("job.running"));
  const progress = h("progress", { max: 100 });
  const entry = h("div", { class: "job running" }, h("span", { class: "job-name" }, label), " ", status, progress);
  document.getElementById("jobs")?.prepend(entry);
  try {
    const reply = await call(name, params, (p) => {
      const percent = parseFloat(p);
      if (Number.isFinite(percent)) progress.value = percent;
      status.textContent = t("job.progress", { progress: p });
    });
    entry.className = "job done";
    status.textContent = t("job.done");
    progress.value = 100;
    setTimeout(() => entry.remove(), 6000);
    return reply;
  } catch (err) {
    entry.className = "job failed";
    status.textContent = t("job.failed");
    progress.remove();
    entry.append(errorBox(err));
    entry.append(h("button", { type: "button", class: "dismiss", onclick: () => entry.remove() }, t("act.dismiss")));
    throw err;
  }
}

// ---- formatting --------------------------------------------------------------------------------

function cell(name, value) {
  if (value === undefined || value === null || value === "") return "";
  if (SIZE_FIELDS.has(name)) return i18n.formatSize(value);
  if (DATE_FIELDS.has(name)) return i18n.formatDate(value);
  if (name === "state" || name === "status") {
    return h("span", { class: `badge ${String(value).toLowerCase()}`, dataset: { state: value } },
      i18n.has(`st.${value}`) ? t(`st.${value}`) : value);
  }
  if (typeof value === "boolean") return value ? t("app.yes") : t("app.no");
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

// in a list a uuid is its first 8 characters (the whole in the tooltip and the detail page)
function listCell(name, value) {
  if (typeof value === "string" && /^[0-9a-f]{32}$/.test(value) && (name === "uuid" || name.endsWith("Uuid"))) {
    return h("span", { class: "uuid", title: value }, value.slice(0, 8));
  }
  return cell(name, value);
}

function applies(action, row) {
  return !action.when || Object.entries(action.when).every(([field, values]) => values.includes(row[field]));
}

// ---- forms ---------------------------------------------------------------------------------------

const SIZE_UNITS = { "": 1, B: 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

function parseSize(text) {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([BKMGT]?)i?B?\s*$/i.exec(text);
  if (!m) throw new Error(t("form.badSize", { value: text }));
  return Math.round(parseFloat(m[1]) * SIZE_UNITS[m[2].toUpperCase()]);
}

async function sha512(text) {
  if (!crypto.subtle) throw new Error(t("form.needsSecureContext"));
  const digest = await crypto.subtle.digest("SHA-512", new TextEncoder().encode(text));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function refOptions(field, context) {
  const target = app.resources[field.ref];
  const conditions = (field.filter || []).map(([name, op, value]) => ({
    name, op, value: value === "$uuid" ? context.uuid : value,
  }));
  const reply = await call(target.query, { conditions, limit: 200 });
  return reply.inventories.map((inv) => {
    const text = inv.name ? `${inv.name} (${inv.uuid.slice(0, 8)})` : inv.ip ? `${inv.ip} (${inv.uuid.slice(0, 8)})` : inv.uuid;
    return h("option", { value: inv.uuid }, text);
  });
}

async function input(field, context) {
  const id = `f-${field.name}`;
  let control;
  if (field.ref) {
    control = h("select", { id, name: field.name, multiple: field.multi || false },
      field.required || field.multi ? null : h("option", { value: "" }, t("form.none")), await refOptions(field, context));
  } else if (field.values) {
    control = h("select", { id, name: field.name, multiple: field.multi || false },
      field.required || field.multi ? null : h("option", { value: "" }, t("form.default")),
      field.values.map((v) => h("option", { value: v }, v)));
  } else if (field.type === "textarea") {
    control = h("textarea", { id, name: field.name, rows: 4 });
  } else {
    control = h("input", {
      id, name: field.name, type: field.type === "password" ? "password" : field.type === "number" ? "number" : "text",
      value: field.from ? context[field.from] : field.default || "", placeholder: field.type === "size" ? "512M, 1G" : null,
    });
  }
  control.required = Boolean(field.required);
  return h("div", { class: "field" }, h("label", { for: id }, i18n.fieldLabel(field.name), field.required ? " *" : ""), control);
}

async function readForm(form, fields) {
  const params = {};
  for (const field of fields) {
    const control = form.elements[field.name];
    let value = control.multiple ? [...control.selectedOptions].map((o) => o.value) : control.value.trim();
    if (value === "" || (Array.isArray(value) && !value.length)) continue;
    if (field.type === "size") value = parseSize(value);
    else if (field.type === "number") value = Number(value);
    else if (field.digest) value = await sha512(value);
    params[field.name] = value;
  }
  return params;
}

// a dialog with the fields' form; resolves with the parameters, or null when cancelled
async function ask(title, fields, context = {}) {
  const controls = [];
  for (const field of fields) controls.push(await input(field, context));
  return new Promise((resolve) => {
    const problem = h("div", { class: "form-problem" });
    const form = h("form", { method: "dialog", class: "dialog-form" }, h("h2", {}, title), controls, problem,
      h("div", { class: "buttons" },
        h("button", { type: "button", value: "cancel", class: "secondary", onclick: () => { dialog.close(); resolve(null); } },
          t("act.cancel")),
        h("button", { type: "submit", class: "primary", id: "submit" }, t("act.submit"))));
    const dialog = h("dialog", {}, form);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const params = await readForm(form, fields);
        dialog.close();
        dialog.remove();
        resolve(params);
      } catch (err) {
        fill(problem, errorBox(err));
      }
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}

function confirmDialog(text) {
  return new Promise((resolve) => {
    const dialog = h("dialog", {}, h("p", {}, text), h("div", { class: "buttons" },
      h("button", { type: "button", class: "secondary", onclick: () => { dialog.remove(); resolve(false); } }, t("act.cancel")),
      h("button", { type: "button", class: "danger", id: "confirm", onclick: () => { dialog.remove(); resolve(true); } },
        t("act.confirm"))));
    document.body.append(dialog);
    dialog.showModal();
  });
}

// ---- actions -------------------------------------------------------------------------------------

async function runAction(type, action, row) {
  const label = `${t(`act.${action.id}`)} ${row.name || row.uuid || ""}`;
  if (action.console) {
    const reply = await job(label, "RequestConsoleAccess", { vmInstanceUuid: row.uuid });
    window.open(reply.inventory.url, "_blank", "noopener");
    return;
  }
  let params = { ...(action.params || {}) };
  if (action.fields) {
    const asked = await ask(label, action.fields, row);
    if (asked === null) return;
    if (action.id === "attachServices") {
      params.networkServices = { [asked.networkServiceProviderUuid]: asked.services };
    } else Object.assign(params, asked);
  } else if (action.danger && !(await confirmDialog(t("confirm.action", { action: t(`act.${action.id}`), name: row.name || row.uuid })))) {
    return;
  }
  const target = action.target ?? "uuid";
  if (target) params[target] = row.uuid;
  for (const name of action.pass || []) params[name] = row[name];
  await job(label, action.api, params).catch(() => {});
  refresh();
}

async function deleteRow(type, row) {
  const r = app.resources[type];
  if (!(await confirmDialog(t("confirm.delete", { name: row.name || row.tag || row.uuid })))) return;
  await job(`${t("act.delete")} ${row.name || row.uuid}`, r.delete, { uuid: row.uuid }).catch(() => {});
  if (app.view?.uuid === row.uuid) location.hash = `#/r/${type}`;
  else refresh();
}

// a list's row offers the actions that ask nothing; its detail page offers them all
function actionButtons(type, row, compact = false) {
  const r = app.resources[type];
  const buttons = (r.actions || []).filter((a) => applies(a, row) && !(compact && a.fields)).map((a) => h("button", {
    type: "button", class: a.danger ? "danger small" : "small", dataset: { action: a.id },
    onclick: (ev) => { ev.stopPropagation(); runAction(type, a, row); },
  }, t(`act.${a.id}`)));
  if (r.delete) {
    buttons.push(h("button", {
      type: "button", class: "danger small", dataset: { action: "delete" },
      onclick: (ev) => { ev.stopPropagation(); deleteRow(type, row); },
    }, t("act.delete")));
  }
  return h("div", { class: "actions" }, buttons);
}

// ---- the generic list page -----------------------------------------------------------------------

function conditionsOf(filter) {
  // "state=Running name~web": field conditions; any other word: the name contains it
  const out = [];
  for (const word of filter.split(/\s+/).filter(Boolean)) {
    const m = /^(\w+(?:\.\w+)*)(!=|>=|<=|=|~|>|<)(.*)$/.exec(word);
    if (m) out.push({ name: m[1], op: m[2] === "~" ? "like" : m[2], value: m[2] === "~" ? `%${m[3]}%` : m[3] });
    else out.push({ name: "name", op: "like", value: `%${word}%` });
  }
  return out;
}

async function listPage(type, keepState) {
  const r = app.resources[type];
  const view = keepState && app.view?.type === type && !app.view.uuid ? app.view
    : { type, start: 0, sortBy: r.columns.includes("createDate") ? "createDate" : "", sortDirection: "desc", filter: "" };
  app.view = view;
  const table = h("table", { class: "list", id: "list", dataset: { resource: type } });
  const pager = h("div", { class: "pager" });
  const problem = h("div", {});
  const filter = h("input", {
    type: "search", id: "filter", value: view.filter, placeholder: t("list.filterHint"), "aria-label": t("list.filter"),
  });
  let typing;
  filter.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { view.filter = filter.value; view.start = 0; load(); }, 300);
  });
  const tools = h("div", { class: "tools" }, filter,
    r.create ? h("button", { type: "button", id: "create", class: "primary", onclick: () => create(type) }, t("act.create")) : null,
    h("button", { type: "button", id: "refresh", onclick: () => load() }, t("act.refresh")));
  frame(t(`res.${type}`), tools, problem, table, pager);
  markNav(type);

  async function load() {
    const params = { conditions: conditionsOf(view.filter), start: view.start, limit: PAGE_SIZE, replyWithCount: true };
    if (view.sortBy) Object.assign(params, { sortBy: view.sortBy, sortDirection: view.sortDirection });
    let reply;
    try {
      reply = await call(r.query, params);
    } catch (err) {
      fill(problem, errorBox(err));
      return;
    }
    clear(problem);
    view.rows = reply.inventories;
    view.total = reply.total ?? reply.inventories.length;
    drawTable(type, view, table, load);
    const last = Math.min(view.start + PAGE_SIZE, view.total);
    fill(pager, 
      h("button", { type: "button", id: "prev", disabled: view.start === 0,
        onclick: () => { view.start = Math.max(0, view.start - PAGE_SIZE); load(); } }, t("list.prev")),
      h("span", { id: "range" }, view.total ? t("list.range", {
        from: i18n.formatNumber(view.start + 1), to: i18n.formatNumber(last), total: i18n.formatNumber(view.total),
      }) : t("list.empty")),
      h("button", { type: "button", id: "next", disabled: last >= view.total,
        onclick: () => { view.start += PAGE_SIZE; load(); } }, t("list.next")));
  }
  view.load = load;
  await load();
}

function drawTable(type, view, table, load) {
  const r = app.resources[type];
  const key = r.key || "uuid";
  const head = h("tr", {}, r.columns.map((col) => {
    const arrow = view.sortBy === col ? (view.sortDirection === "asc" ? " ▲" : " ▼") : "";
    return h("th", { dataset: { sort: col }, onclick: () => {
      view.sortDirection = view.sortBy === col && view.sortDirection === "asc" ? "desc" : "asc";
      view.sortBy = col;
      load();
    } }, i18n.fieldLabel(col), arrow);
  }), h("th", {}, t("list.actions")));
  const rows = view.rows.map((row) => h("tr", {
    dataset: { uuid: row[key] || "" },
    onclick: r.key ? null : () => { location.hash = `#/r/${type}/${row.uuid}`; },
    class: r.key ? "" : "link",
  }, r.columns.map((col) => h("td", { dataset: { field: col } }, listCell(col, row[col]))),
  h("td", {}, actionButtons(type, row, !r.key)))); // a row with no detail page offers every action
  fill(table, h("thead", {}, head), h("tbody", {}, rows));
}

function markNav(page) {
  for (const a of document.querySelectorAll(".nav-item")) a.classList.toggle("current", a.dataset.page === page);
}

async function create(type) {
  const r = app.resources[type];
  if (r.create.wizard === "vm") return vmWizard();
  const params = await ask(`${t("act.create")}: ${t(`res.${type}`)}`, r.create.fields);
  if (params === null) return;
  await job(`${t("act.create")} ${params.name || ""}`, r.create.api, params).catch(() => {});
  refresh();
}

// ---- the detail page -------------------------------------------------------------------------------

async function detailPage(type, uuid) {
  const r = app.resources[type];
  app.view = { type, uuid };
  const body = h("div", { id: "detail", dataset: { resource: type, uuid } });
  frame(t(`res.${type}`), h("a", { href: `#/r/${type}`, class: "back" }, t("detail.back")), body);
  markNav(type);
  async function load() {
    let inv;
    try {
      const reply = await call(r.query, { conditions: [{ name: "uuid", op: "=", value: uuid }] });
      inv = reply.inventories[0];
    } catch (err) {
      fill(body, errorBox(err));
      return;
    }
    if (!inv) {
      fill(body, h("p", { class: "empty" }, t("detail.gone")));
      return;
    }
    const scalar = Object.entries(inv).filter(([, v]) => v === null || typeof v !== "object");
    const children = (r.children || []).filter((name) => Array.isArray(inv[name]) && inv[name].length);
    fill(body, 
      h("h2", {}, inv.name || inv.uuid), actionButtons(type, inv),
      h("table", { class: "fields" }, h("tbody", {}, scalar.map(([k, v]) => h("tr", {}, h("th", {}, i18n.fieldLabel(k)),
        h("td", { dataset: { field: k } }, cell(k, v)))))),
      children.map((name) => childTable(name, inv[name])));
  }
  app.view.load = load;
  await load();
}

function childTable(name, items) {
  const objects = items.map((item) => (typeof item === "object" ? item : { value: item }));
  const cols = [...new Set(objects.flatMap((o) => Object.keys(o).filter((k) => typeof o[k] !== "object")))].slice(0, 8);
  return h("section", { class: "child" }, h("h3", {}, i18n.fieldLabel(name)),
    h("table", { class: "list" }, h("thead", {}, h("tr", {}, cols.map((c) => h("th", {}, i18n.fieldLabel(c))))),
      h("tbody", {}, objects.map((o) => h("tr", {}, cols.map((c) => h("td", {}, cell(c, o[c]))))))));
}

// ---- the VM wizard -------------------------------------------------------------------------------

async function vmWizard() {
  const steps = [
    { title: t("wizard.basics"), fields: [{ name: "name", required: true }, { name: "description" }] },
    { title: t("wizard.image"), fields: [{ name: "imageUuid", ref: "image", required: true, filter: [["status", "=", "Ready"]] }] },
    { title: t("wizard.offering"), fields: [
      { name: "instanceOfferingUuid", ref: "instanceOffering", required: true },
      { name: "rootDiskOfferingUuid", ref: "diskOffering" }] },
    { title: t("wizard.network"), fields: [{ name: "l3NetworkUuids", ref: "l3", multi: true, required: true }] },
    { title: t("wizard.access"), fields: [{ name: "userdata", type: "textarea" }, { name: "sshKey", type: "textarea" }] },
  ];
  const chosen = {};
  for (let i = 0; i < steps.length; i += 1) {
    const params = await ask(t("wizard.step", { n: i + 1, of: steps.length, title: steps[i].title }), steps[i].fields);
    if (params === null) return;
    Object.assign(chosen, params);
  }
  const { userdata, sshKey, ...params } = chosen;
  const tags = [];
  if (userdata) tags.push(`userdata::${btoa(String.fromCharCode(...new TextEncoder().encode(userdata)))}`);
  if (sshKey) tags.push(`sshkey::${sshKey.trim()}`);
  if (tags.length) params.systemTags = tags;
  const reply = await job(`${t("act.create")} ${params.name}`, "CreateVmInstance", params).catch(() => null);
  if (reply) location.hash = `#/r/vm/${reply.inventory.uuid}`;
}

// ---- the dashboard -------------------------------------------------------------------------------

function meter(label, used, total, format, id) {
  const free = Math.max(0, Number(total) - Number(used));
  return h("div", { class: "meter", dataset: { meter: id } }, h("div", { class: "meter-label" }, label),
    h("progress", { max: Number(total) || 1, value: Number(used) || 0 }),
    h("div", { class: "meter-text" }, t("dash.usage", { used: format(used), total: format(total), free: format(free) })));
}

async function dashboard() {
  app.view = { type: "dashboard" };
  const body = h("div", { id: "dashboard" });
  frame(t("nav.dashboard"), body);
  markNav("dashboard");
  async function load() {
    try {
      const zones = app.me.isAdmin ? (await call("QueryZone", { conditions: [], limit: 50 })).inventories : [];
      const cards = [];
      for (const zone of zones) {
        const scope = { zoneUuids: [zone.uuid] };
        const [cpu, ps, bs, ip] = await Promise.all([
          call("GetCpuMemoryCapacity", scope), call("GetPrimaryStorageCapacity", scope),
          call("GetBackupStorageCapacity", scope), call("GetIpAddressCapacity", scope),
        ]);
        const num = (n) => i18n.formatNumber(n);
        cards.push(h("section", { class: "card", dataset: { zone: zone.uuid } }, h("h2", {}, `${t("dash.zone")}: ${zone.name}`),
          meter(t("dash.cpu"), cpu.totalCpu - cpu.availableCpu, cpu.totalCpu, num, "cpu"),
          meter(t("dash.memory"), cpu.totalMemory - cpu.availableMemory, cpu.totalMemory, i18n.formatSize, "memory"),
          meter(t("dash.primary"), ps.totalCapacity - ps.availableCapacity, ps.totalCapacity, i18n.formatSize, "primary"),
          meter(t("dash.backup"), bs.totalCapacity - bs.availableCapacity, bs.totalCapacity, i18n.formatSize, "backup"),
          meter(t("dash.ip"), ip.totalCapacity - ip.availableCapacity, ip.totalCapacity, num, "ip")));
      }
      const vms = await call("QueryVmInstance", { conditions: [], count: true });
      fill(body, h("p", { class: "summary", id: "vm-count" }, t("dash.vms", { count: i18n.formatNumber(vms.total) })),
        cards.length ? cards : app.me.isAdmin ? h("p", { class: "empty" }, t("dash.noZones")) : null);
    } catch (err) {
      fill(body, errorBox(err));
    }
  }
  app.view.load = load;
  await load();
}

// ---- login, live events, routing -------------------------------------------------------------------

function loginPage(problem = null) {
  app.view = null;
  const name = h("input", { id: "account", name: "account", autocomplete: "username", required: true });
  const password = h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: true });
  const note = h("div", { id: "login-problem" }, problem ? errorBox(problem) : null);
  const form = h("form", { id: "login", class: "login" },
    h("h1", {}, t("app.title")), h("h2", {}, t("login.title")),
    h("div", { class: "field" }, h("label", { for: "account" }, t("login.account")), name),
    h("div", { class: "field" }, h("label", { for: "password" }, t("login.password")), password),
    note, h("div", { class: "buttons" }, languageSelect(), h("button", { type: "submit", class: "primary", id: "login-submit" }, t("login.submit"))));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const reply = await login(name.value.trim(), password.value);
      if (!reply.success) throw new ApiFailure(reply.error || {});
      app.me = { accountName: reply.accountName, isAdmin: reply.isAdmin, accountUuid: reply.inventory.accountUuid };
      connectEvents();
      if (!location.hash || location.hash === "#/login") location.hash = "#/";
      else route();
    } catch (err) {
      fill(note, errorBox(err));
    }
  });
  fill(root, form);
  name.focus();
}

async function doLogout() {
  await logout().catch(() => {});
  app.me = null;
  app.events?.close();
  app.events = null;
  loginPage();
}

let pending = null;
function refresh() {
  // events come in bursts (a job's start and end, a host's reconnect): one reload for a burst
  if (pending) return;
  pending = setTimeout(() => {
    pending = null;
    app.view?.load?.();
  }, 100);
}

function concerns(view, event) {
  if (!view || event.overflow) return true;
  if (view.type === "dashboard") return true;
  const base = app.resources[view.type]?.query.replace(/^Query/, "") || "";
  if (view.uuid) return event.uuid === view.uuid || (event.api || "").includes(base);
  if (event.resourceType === `${base}VO`) return true;
  if ((event.api || "").includes(base)) return true;
  return (view.rows || []).some((row) => row.uuid === event.uuid);
}

function connectEvents() {
  app.events?.close();
  const source = new EventSource("/ui/events");
  app.events = source;
  source.onopen = () => {
    setLive(true);
    refresh(); // after a reconnect: what changed while the stream was down
  };
  source.onerror = () => setLive(false);
  source.onmessage = (msg) => {
    const event = JSON.parse(msg.data);
    if (concerns(app.view, event)) refresh();
  };
  source.addEventListener("session", () => { source.close(); loginPage(); });
}

function route() {
  if (!app.me) return loginPage();
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  if (parts[0] === "r" && app.resources[parts[1]]) {
    return parts[2] ? detailPage(parts[1], decodeURIComponent(parts[2])) : listPage(parts[1]);
  }
  return dashboard();
}

async function boot() {
  await i18n.setLanguage(i18n.initialLanguage(), false);
  app.resources = await (await fetch("/ui/static/resources.json", { credentials: "same-origin" })).json();
  whenSessionLost(() => { app.me = null; loginPage(); });
  const me = await whoami();
  if (me) {
    app.me = { accountName: me.accountName, isAdmin: me.isAdmin, accountUuid: me.accountUuid };
    connectEvents();
  }
  window.addEventListener("hashchange", route);
  route();
}

boot();
