// Message catalogs (i18n/<lang>.json), the chosen language, and per-locale formats (Intl).

export const LANGUAGES = { en: "English", zh_CN: "简体中文", zh_TW: "繁體中文" };
const STORED = "nimbostack.lang";
let lang = "en";
let catalog = {};
let fallback = {};

export function browserLanguage(preferred = navigator.languages || [navigator.language || "en"]) {
  for (const tag of preferred) {
    const low = String(tag).toLowerCase();
    if (low.startsWith("zh")) {
      return /(tw|hk|mo|hant)/.test(low) ? "zh_TW" : "zh_CN";
    }
    if (low.startsWith("en")) return "en";
  }
  return "en";
}

async function load(code) {
  const r = await fetch(`/ui/static/i18n/${code}.json`, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`catalog ${code}: HTTP ${r.status}`);
  return r.json();
}

export async function setLanguage(code, remember = true) {
  if (!(code in LANGUAGES)) code = "en";
  if (!Object.keys(fallback).length) fallback = await load("en");
  catalog = code === "en" ? fallback : await load(code);
  lang = code;
  document.documentElement.lang = locale();
  if (remember) localStorage.setItem(STORED, code);
  for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
}

export function initialLanguage() {
  return localStorage.getItem(STORED) || browserLanguage();
}

export function language() {
  return lang;
}

export function locale() {
  return lang.replace("_", "-");
}

export function has(key) {
  return key in catalog || key in fallback;
}

// t(key, {name}) — "{name}" placeholders are filled with text, never markup
export function t(key, vars = {}) {
  const text = catalog[key] ?? fallback[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => (name in vars ? String(vars[name]) : `{${name}}`));
}

// a label for an inventory field: its catalog entry when there is one, else the API's own name
export function fieldLabel(name) {
  return has(`f.${name}`) ? t(`f.${name}`) : name;
}

export function formatDate(value) {
  if (!value) return "";
  const date = new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  return new Intl.DateTimeFormat(locale(), { dateStyle: "medium", timeStyle: "medium" }).format(date);
}

const UNITS = ["byte", "kilobyte", "megabyte", "gigabyte", "terabyte", "petabyte"];

export function formatSize(bytes) {
  let n = Number(bytes);
  if (!Number.isFinite(n)) return String(bytes ?? "");
  let unit = 0;
  while (Math.abs(n) >= 1024 && unit < UNITS.length - 1) {
    n /= 1024;
    unit += 1;
  }
  return new Intl.NumberFormat(locale(), {
    style: "unit", unit: UNITS[unit], unitDisplay: "short", maximumFractionDigits: unit ? 1 : 0,
  }).format(n);
}

export function formatNumber(n) {
  return new Intl.NumberFormat(locale()).format(Number(n));
}
