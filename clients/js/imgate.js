// imgate browser client: one protocol over WebTransport or WebSocket (docs/protocol.md).
//
// A plain ES module with no dependencies and no build step. Types are in imgate.d.ts.
//
//   import { ImgateClient } from "./imgate.js";
//   const client = new ImgateClient({
//     webSocketUrl: "wss://chat.example.com/ws",
//     webTransportUrl: "https://chat.example.com:4433/wt",
//     token: async () => (await fetch("/my/token")).text(),
//   });
//   client.addEventListener("push", (e) => console.log(e.detail.body));
//   client.connect();
//   await client.send({ to: "bob", body: { text: "hi" } });
//
// What it does for you: picks WebTransport when the browser has it and falls back to
// WebSocket when it is missing, blocked or fails; reconnects with backoff and jitter on 41xx
// (and on a lost connection), stops on 45xx (4501 with a token callback: refreshes and
// reconnects); acks durable pushes and resumes from the last position it processed, kept in
// localStorage per user and device, so nothing is lost or shown twice across reconnects,
// transport switches and page reloads.

const WT_READY_TIMEOUT_MS = 4000;
/** After WebTransport fails to connect, use WebSocket for this long before trying again. */
const WT_RETRY_AFTER_MS = 60000;

/** @param {number} code */
export function shouldReconnect(code) {
  // 41xx, a failed handshake and a close without a code are retryable; 45xx are not.
  return !(code >= 4500 && code < 4600);
}

/** Full-jitter exponential backoff: a random delay in [min, min(max, min * 2^attempt)]. */
export function backoffDelay(attempt, minMs = 500, maxMs = 30000, random = Math.random) {
  const cap = Math.min(maxMs, minMs * 2 ** Math.min(attempt, 16));
  return minMs + random() * (cap - minMs);
}

/** Splits a byte stream into the 4-byte big-endian length-prefixed frames of SPEC §3. */
export class FrameReader {
  constructor(maxFrame = 16 * 1024 * 1024) {
    this.buf = new Uint8Array(0);
    this.maxFrame = maxFrame;
  }
  /** @param {Uint8Array} chunk @returns {Uint8Array[]} whole frames */
  push(chunk) {
    const joined = new Uint8Array(this.buf.length + chunk.length);
    joined.set(this.buf);
    joined.set(chunk, this.buf.length);
    const frames = [];
    let at = 0;
    while (joined.length - at >= 4) {
      const len = new DataView(joined.buffer, joined.byteOffset + at, 4).getUint32(0);
      if (len > this.maxFrame) throw new Error(`frame of ${len} bytes`);
      if (joined.length - at - 4 < len) break;
      frames.push(joined.slice(at + 4, at + 4 + len));
      at += 4 + len;
    }
    this.buf = joined.slice(at);
    return frames;
  }
}

/** @param {Uint8Array} payload */
export function frameBytes(payload) {
  const out = new Uint8Array(4 + payload.length);
  new DataView(out.buffer).setUint32(0, payload.length);
  out.set(payload, 4);
  return out;
}

const enc = new TextEncoder();
const dec = new TextDecoder();

function base64ToBytes(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** A position `<epoch>:<seq>` as the server writes it. */
function parsePosition(p) {
  if (typeof p !== "string") return null;
  const i = p.lastIndexOf(":");
  if (i <= 0) return null;
  const seq = Number(p.slice(i + 1));
  return Number.isSafeInteger(seq) ? { epoch: p.slice(0, i), seq } : null;
}

function randomId() {
  const b = new Uint8Array(8);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function storage() {
  try {
    return globalThis.localStorage ?? null;
  } catch {
    return null;
  }
}

/** WebTransport: one control stream, length-prefixed frames. */
class WtLink {
  static async open(url, certHashes, signal) {
    const options = {};
    if (certHashes && certHashes.length) {
      options.serverCertificateHashes = certHashes.map((h) => ({
        algorithm: "sha-256",
        value: base64ToBytes(h),
      }));
    }
    const wt = new WebTransport(url, options);
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error("WebTransport did not connect in time")), WT_READY_TIMEOUT_MS);
    });
    const aborted = new Promise((_, reject) => {
      signal?.addEventListener("abort", () => reject(new Error("aborted")), { once: true });
    });
    try {
      await Promise.race([wt.ready, timeout, aborted]);
      const stream = await wt.createBidirectionalStream();
      return new WtLink(wt, stream);
    } catch (e) {
      try {
        wt.close();
      } catch {}
      wt.closed.catch(() => {});
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  constructor(wt, stream) {
    this.kind = "webtransport";
    this.wt = wt;
    this.writer = stream.writable.getWriter();
    this.reader = stream.readable.getReader();
    this.frames = new FrameReader();
  }

  /** @param {string} text */
  send(text) {
    // Writes are queued by the stream in order; a failure shows up as the session closing.
    this.writer.write(frameBytes(enc.encode(text))).catch(() => {});
  }

  /** Calls onFrame for each frame, then onEnd(code) once. */
  run(onFrame, onEnd) {
    (async () => {
      try {
        for (;;) {
          const { value, done } = await this.reader.read();
          if (done) break;
          for (const f of this.frames.push(value)) onFrame(dec.decode(f));
        }
      } catch {}
      let code = 0;
      try {
        const info = await this.wt.closed;
        code = info?.closeCode ?? 0;
      } catch {}
      onEnd(code);
    })();
  }

  close(code = 1000, reason = "") {
    try {
      this.wt.close({ closeCode: code, reason });
    } catch {}
  }
}

/** WebSocket: one text message per frame. */
class WsLink {
  static open(url, signal) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, ["imgate.v1.json"]);
      const fail = () => reject(new Error("WebSocket did not connect"));
      ws.addEventListener("open", () => resolve(new WsLink(ws)), { once: true });
      ws.addEventListener("error", fail, { once: true });
      ws.addEventListener("close", fail, { once: true });
      signal?.addEventListener("abort", () => {
        ws.close();
        reject(new Error("aborted"));
      });
    });
  }

  constructor(ws) {
    this.kind = "websocket";
    this.ws = ws;
  }

  send(text) {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(text);
  }

  run(onFrame, onEnd) {
    this.ws.addEventListener("message", (e) => {
      if (typeof e.data === "string") onFrame(e.data);
    });
    this.ws.addEventListener("close", (e) => onEnd(e.code), { once: true });
  }

  close(code = 1000, reason = "") {
    try {
      this.ws.close(code, reason);
    } catch {}
  }
}

/**
 * A connection to imgate that stays up: see imgate.d.ts for the options and events.
 */
export class ImgateClient extends EventTarget {
  /** @param {import("./imgate").ImgateOptions} options */
  constructor(options) {
    super();
    if (!options || (!options.webSocketUrl && !options.webTransportUrl)) {
      throw new Error("webSocketUrl or webTransportUrl is required");
    }
    this.options = {
      transports: ["webtransport", "websocket"],
      reconnect: true,
      minDelayMs: 500,
      maxDelayMs: 30000,
      persist: true,
      ...options,
    };
    this.state = "idle";
    /** @type {"webtransport"|"websocket"|null} */
    this.transport = null;
    this.welcome = null;
    this.link = null;
    this.attempt = 0;
    this.nextId = 1;
    /** @type {Map<string, {resolve: Function, reject: Function}>} */
    this.pending = new Map();
    this.position = null; // { epoch, seq } of the last durable push handled
    this.wtFailedAt = -Infinity;
    this.stopped = true;
    this.timer = null;
    this.heartbeat = null;
    this.abort = null;
  }

  /** Connect, and stay connected until close() or a 45xx code. */
  connect() {
    if (!this.stopped) return;
    this.stopped = false;
    this.attempt = 0;
    this.open();
  }

  /** Close for good (no reconnect). */
  close() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.abort?.abort();
    this.teardown(1000, "client closed");
    this.setState("closed", { code: 1000, reason: "client closed" });
  }

  /**
   * Send a message through the gateway; resolves with the reply's body, rejects with an
   * Error carrying `code` when the reply is not ok or the connection drops first.
   * @param {{to?: string, group?: string, kind?: string, body: any}} msg
   */
  send(msg) {
    if (this.state !== "open") return Promise.reject(Object.assign(new Error("not connected"), { code: "not_connected" }));
    const id = `c${this.nextId++}`;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.write({ type: "send", id, ...msg });
    });
  }

  /** The resume position this client holds (`<epoch>:<seq>`), or null. */
  get since() {
    return this.position ? `${this.position.epoch}:${this.position.seq}` : null;
  }

  // ---- connection lifecycle ---------------------------------------------------------

  async open() {
    clearTimeout(this.timer);
    this.setState("connecting", { attempt: this.attempt });
    const abort = new AbortController();
    this.abort = abort;
    let token;
    try {
      token = typeof this.options.token === "function" ? await this.options.token() : this.options.token;
    } catch (e) {
      return this.lost(0, `no token: ${e?.message ?? e}`);
    }
    this.loadPosition();
    let link = null;
    for (const kind of this.candidates()) {
      try {
        link = kind === "webtransport" ? await this.openWt(abort.signal) : await WsLink.open(this.wsUrl(), abort.signal);
        break;
      } catch (e) {
        if (abort.signal.aborted) return;
        if (kind === "webtransport") {
          this.wtFailedAt = Date.now();
          this.dispatch("fallback", { from: "webtransport", error: String(e?.message ?? e) });
        }
      }
    }
    if (abort.signal.aborted) return link?.close();
    if (!link) return this.lost(0, "no transport could connect");
    this.link = link;
    this.transport = link.kind;
    link.run(
      (text) => link === this.link && this.onFrame(text),
      (code) => link === this.link && this.onEnd(code),
    );
    // The first frame: authenticates, and announces the WebTransport control stream.
    this.write({ type: "auth", token, ...(this.since ? { since: this.since } : {}) });
  }

  candidates() {
    const wanted = this.options.transports;
    const haveWt = typeof globalThis.WebTransport === "function" && this.options.webTransportUrl;
    const wtCoolingDown = Date.now() - this.wtFailedAt < WT_RETRY_AFTER_MS;
    return wanted.filter((k) => {
      if (k === "webtransport") return haveWt && !(wtCoolingDown && wanted.includes("websocket"));
      if (k === "websocket") return !!this.options.webSocketUrl;
      return false;
    });
  }

  async openWt(signal) {
    let hashes = this.options.serverCertificateHashes;
    if (!hashes && this.options.certHashUrl) {
      const doc = await (await fetch(this.options.certHashUrl, { cache: "no-store" })).json();
      hashes = (doc.hashes ?? [doc]).map((h) => h.sha256_b64);
    }
    return WtLink.open(this.wtUrl(), hashes, signal);
  }

  query() {
    const q = new URLSearchParams();
    if (this.options.device) q.set("device", this.options.device);
    if (this.options.platform) q.set("platform", this.options.platform);
    const s = q.toString();
    return s ? `?${s}` : "";
  }

  wsUrl() {
    return this.options.webSocketUrl + this.query();
  }

  wtUrl() {
    return this.options.webTransportUrl + this.query();
  }

  teardown(code, reason) {
    clearInterval(this.heartbeat);
    this.heartbeat = null;
    const link = this.link;
    this.link = null;
    link?.close(code, reason);
    for (const [, p] of this.pending) p.reject(Object.assign(new Error("disconnected"), { code: "disconnected" }));
    this.pending.clear();
  }

  onEnd(closeCode) {
    // `kick` is authoritative; else the transport's code.
    const code = this.kickCode ?? closeCode;
    const reason = this.kickReason ?? "";
    this.kickCode = this.kickReason = undefined;
    this.teardown(1000, "");
    this.lost(code, reason);
  }

  async lost(code, reason) {
    if (this.stopped) return;
    this.welcome = null;
    const refreshable = code === 4501 && typeof this.options.token === "function";
    if (!this.options.reconnect || (!shouldReconnect(code) && !refreshable)) {
      this.stopped = true;
      this.setState("closed", { code, reason });
      return;
    }
    const delay = backoffDelay(this.attempt++, this.options.minDelayMs, this.options.maxDelayMs);
    this.setState("reconnecting", { code, reason, delayMs: Math.round(delay) });
    this.timer = setTimeout(() => this.open(), delay);
  }

  // ---- frames -----------------------------------------------------------------------

  write(frame) {
    this.link?.send(JSON.stringify(frame));
  }

  onFrame(text) {
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    switch (f.type) {
      case "welcome":
        this.welcome = f;
        this.attempt = 0;
        this.setState("open", { transport: this.transport, welcome: f });
        if (this.transport === "webtransport") {
          // No automatic pongs on WebTransport: keep the session alive with pings.
          this.heartbeat = setInterval(() => this.write({ type: "ping" }), Math.max(1000, f.heartbeat_ms || 25000));
        }
        break;
      case "push":
        this.onPush(f);
        break;
      case "synced":
        this.dispatch("synced", f);
        break;
      case "reply": {
        const p = this.pending.get(f.id);
        if (!p) break;
        this.pending.delete(f.id);
        if (f.ok) p.resolve(f.body);
        else p.reject(Object.assign(new Error(f.message || f.code), { code: f.code }));
        this.dispatch("reply", f);
        break;
      }
      case "kick":
        this.kickCode = f.code;
        this.kickReason = f.reason;
        this.dispatch("kick", f);
        // Close at once: the server waits for us (up to 1 s) before closing itself.
        this.link?.close(1000, "");
        break;
      case "error":
        this.dispatch("servererror", f);
        break;
      default:
        this.dispatch(f.type, f);
    }
  }

  onPush(f) {
    if (f.seq !== undefined && f.epoch !== undefined) {
      const held = this.position;
      if (held && held.epoch === f.epoch && f.seq <= held.seq) {
        // Already handled (a resend after a reconnect): ack again, do not show twice.
        this.write({ type: "ack", seq: held.seq, epoch: held.epoch });
        return;
      }
      this.dispatch("push", f);
      this.position = { epoch: f.epoch, seq: f.seq };
      this.savePosition();
      this.write({ type: "ack", seq: f.seq, epoch: f.epoch });
    } else {
      this.dispatch("push", f);
    }
  }

  // ---- resume position --------------------------------------------------------------

  storageKey() {
    const user = this.options.user ?? "";
    return `imgate.position.${user}.${this.options.device ?? ""}`;
  }

  loadPosition() {
    if (this.position || !this.options.persist) return;
    const p = parsePosition(storage()?.getItem(this.storageKey()));
    if (p) this.position = p;
  }

  savePosition() {
    if (!this.options.persist) return;
    try {
      storage()?.setItem(this.storageKey(), this.since);
    } catch {}
  }

  // ---- events -----------------------------------------------------------------------

  setState(state, detail = {}) {
    this.state = state;
    this.dispatch("status", { state, transport: this.transport, ...detail });
  }

  dispatch(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
