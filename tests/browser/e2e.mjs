// Browser end-to-end test: the demo page (GET /) and clients/js in headless Chromium against a
// real gateway, over WebTransport and WebSocket.
//
//   node tests/browser/e2e.mjs            (scripts/test runs it after the Rust suites)
//
// IMGATE_BIN names the gateway binary (default target/debug/imgate); CHROMIUM the browser
// (default /usr/bin/chromium). Every wait is on an event or a page condition, bounded.

import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { createSocket } from "node:dgram";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const BIN = process.env.IMGATE_BIN ?? join(root, "target", "debug", "imgate");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const WAIT = 20000;
// Pages of one browser share a window: only the last one shown runs requestAnimationFrame,
// Playwright's default polling for waitForFunction, so poll on a timer instead.

function freeTcpPort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function freeUdpPort() {
  return new Promise((resolve, reject) => {
    const s = createSocket("udp4");
    s.once("error", reject);
    s.bind(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function startGateway() {
  const [http, https, grpc, ops, wt] = await Promise.all([freeTcpPort(), freeTcpPort(), freeTcpPort(), freeTcpPort(), freeUdpPort()]);
  const env = {
    ...process.env,
    IMGATE__LISTEN__HTTP: `127.0.0.1:${http}`,
    IMGATE__LISTEN__HTTPS: `127.0.0.1:${https}`,
    IMGATE__LISTEN__GRPC: `127.0.0.1:${grpc}`,
    IMGATE__LISTEN__OPS: `127.0.0.1:${ops}`,
    IMGATE__LISTEN__WEBTRANSPORT: `127.0.0.1:${wt}`,
    IMGATE__LOG__LEVEL: "warn",
    // Low enough that a page can provoke 4104 in a test, high enough for everything else.
    IMGATE__LIMITS__RATE_PER_SEC: "40",
    IMGATE__LIMITS__RATE_BURST: "40",
    IMGATE__LIMITS__RATE_CLOSE_AFTER: "500ms",
  };
  const proc = spawn(BIN, ["serve"], { env, stdio: ["ignore", "inherit", "inherit"] });
  const exited = new Promise((_, reject) => proc.once("exit", (code) => reject(new Error(`imgate exited with ${code}`))));
  const ready = (async () => {
    for (;;) {
      try {
        if ((await fetch(`http://127.0.0.1:${ops}/readyz`)).ok) return;
      } catch {}
      await new Promise((r) => setTimeout(r, 50));
    }
  })();
  await within(Promise.race([ready, exited]), "the gateway to become ready");
  return { proc, base: `http://127.0.0.1:${http}`, wt };
}

function within(promise, what, ms = WAIT) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function assert(cond, message) {
  if (!cond) throw new Error(`assertion failed: ${message}`);
}

function assertEqual(actual, expected, message) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new Error(`${message}: expected ${e}, got ${a}`);
}

/** Open the demo as `user`; resolves once connected, with the transport it used. */
async function openDemo(context, base, query) {
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[page ${query}] ${e}`));
  await page.goto(`${base}/?${query}`);
  await waitOpen(page);
  return page;
}

/** Wait until the demo on `page` says it is connected. */
const waitOpen = (page) =>
  page.waitForFunction(() => document.getElementById("status").dataset.state === "open", null, { timeout: WAIT, polling: 50 });

const transportOf = (page) => page.evaluate(() => document.getElementById("status").dataset.transport);

/** The chat lines a page received as pushes: [{seq, from, text}]. */
const received = (page) =>
  page.evaluate(() =>
    [...document.querySelectorAll("#messages li.msg")].map((li) => ({
      seq: Number(li.dataset.seq),
      from: li.dataset.from,
      text: li.lastChild.textContent,
    })),
  );

async function send(page, to, text) {
  // Clicks wait for animation frames, which only the page in front gets.
  await page.bringToFront();
  await page.fill("#peer", to);
  await page.fill("#text", text);
  await page.click("#send");
  // The demo clears the input once the gateway replied ok.
  await page.waitForFunction(() => document.getElementById("text").value === "", null, { timeout: WAIT, polling: 50 });
}

async function waitForText(page, text) {
  await page.waitForFunction(
    (t) => [...document.querySelectorAll("#messages li.msg")].some((li) => li.lastChild.textContent === t),
    text,
    { timeout: WAIT, polling: 50 },
  );
}

const tests = [];
const test = (name, fn) => tests.push({ name, fn });

test("two pages chat over WebTransport", async ({ context, base }) => {
  const alice = await openDemo(context, base, "user=alice1&peer=bob1");
  const bob = await openDemo(context, base, "user=bob1&peer=alice1");
  assertEqual(await transportOf(alice), "webtransport", "alice's transport");
  assertEqual(await transportOf(bob), "webtransport", "bob's transport");
  await send(alice, "bob1", "hello bob");
  await waitForText(bob, "hello bob");
  await send(bob, "alice1", "hi alice");
  await waitForText(alice, "hi alice");
  assertEqual(await received(bob), [{ seq: 1, from: "alice1", text: "hello bob" }], "bob's messages");
  assertEqual(await received(alice), [{ seq: 1, from: "bob1", text: "hi alice" }], "alice's messages");
});

test("a page forced onto WebSocket chats with one on WebTransport", async ({ context, base }) => {
  const wt = await openDemo(context, base, "user=wendy&peer=sam");
  const ws = await openDemo(context, base, "user=sam&peer=wendy&transport=websocket");
  assertEqual(await transportOf(wt), "webtransport", "wendy's transport");
  assertEqual(await transportOf(ws), "websocket", "sam's transport");
  await send(wt, "sam", "over QUIC");
  await waitForText(ws, "over QUIC");
  await send(ws, "wendy", "over TCP");
  await waitForText(wt, "over TCP");
});

test("WebTransport that cannot connect falls back to WebSocket", async ({ context, base }) => {
  // Nothing listens on UDP port 9 here: the WebTransport attempt fails, WebSocket is used.
  const page = await openDemo(context, base, "user=fiona&peer=fiona&webtransport_port=9");
  assertEqual(await transportOf(page), "websocket", "fiona's transport");
  await send(page, "fiona", "note to self");
  await waitForText(page, "note to self");
});

test("a reloaded page receives what it missed exactly once", async ({ context, base }) => {
  const alice = await openDemo(context, base, "user=alice2&peer=bob2");
  const bob = await openDemo(context, base, "user=bob2&peer=alice2");
  await send(alice, "bob2", "before");
  await waitForText(bob, "before");
  // Bob leaves; alice keeps sending.
  await bob.goto("about:blank");
  for (const t of ["missed 1", "missed 2", "missed 3"]) await send(alice, "bob2", t);
  // Bob comes back on the same device (the page keeps its device and position).
  await bob.goto(`${base}/?user=bob2&peer=alice2`);
  await waitOpen(bob);
  await waitForText(bob, "missed 3");
  // One live message after the replay: everything before it has arrived by then.
  await send(alice, "bob2", "live");
  await waitForText(bob, "live");
  assertEqual(
    (await received(bob)).map((m) => `${m.seq} ${m.text}`),
    ["2 missed 1", "3 missed 2", "4 missed 3", "5 live"],
    "bob's messages after the reload",
  );
});

test("a reload during a WebSocket session resumes the same way", async ({ context, base }) => {
  const alice = await openDemo(context, base, "user=alice3&peer=bob3");
  const bob = await openDemo(context, base, "user=bob3&peer=alice3&transport=websocket");
  await send(alice, "bob3", "one");
  await waitForText(bob, "one");
  await bob.goto("about:blank");
  await send(alice, "bob3", "two");
  await bob.goto(`${base}/?user=bob3&peer=alice3`); // auto: now over WebTransport
  await waitOpen(bob);
  await waitForText(bob, "two");
  await send(alice, "bob3", "three");
  await waitForText(bob, "three");
  assertEqual(await transportOf(bob), "webtransport", "bob's transport after the switch");
  assertEqual((await received(bob)).map((m) => m.text), ["two", "three"], "bob's messages");
});

test("41xx reconnects by itself; 45xx stops", async ({ context, base }) => {
  const page = await openDemo(context, base, "user=rita&peer=rita");
  // Record every status change, then flood pings until the server closes with 4104.
  await page.evaluate(() => {
    window.statuses = [];
    window.imgate.addEventListener("status", (e) => window.statuses.push({ state: e.detail.state, code: e.detail.code }));
    window.flood = setInterval(() => {
      for (let i = 0; i < 10; i++) window.imgate.write({ type: "ping" });
    }, 10);
  });
  await page.waitForFunction(() => window.statuses.some((s) => s.state === "reconnecting" && s.code === 4104), null, { timeout: WAIT, polling: 50 });
  await page.evaluate(() => clearInterval(window.flood));
  await page.waitForFunction(() => window.statuses.at(-1)?.state === "open", null, { timeout: WAIT, polling: 50 });

  // A refused token (4500) is final: no reconnect.
  const end = await page.evaluate(async (wsUrl) => {
    const { ImgateClient } = await import("/imgate.js");
    const c = new ImgateClient({ webSocketUrl: wsUrl, token: "not-a-token", transports: ["websocket"], minDelayMs: 10, maxDelayMs: 20 });
    const states = [];
    const closed = new Promise((resolve) => c.addEventListener("status", (e) => {
      states.push(e.detail.state);
      if (e.detail.state === "closed") resolve(e.detail.code);
    }));
    c.connect();
    const code = await closed;
    // Stopped for good: no reconnect is scheduled.
    return { code, states, stopped: c.stopped, scheduled: c.timer !== null };
  }, base.replace("http", "ws") + "/ws");
  assertEqual(end, { code: 4500, states: ["connecting", "closed"], stopped: true, scheduled: false }, "a client with a bad token");
});

test("4501 with a token callback refreshes and reconnects", async ({ context, base }) => {
  const page = await context.newPage();
  await page.goto(`${base}/?user=tom`);
  // A token that expires in 2 s, then fresh ones from /dev/token.
  const short = await new Promise((resolve, reject) => {
    const p = spawn(BIN, ["token", "--user", "tom", "--device", "t1", "--ttl", "2s"], { stdio: ["ignore", "pipe", "ignore"] });
    let out = "";
    p.stdout.on("data", (d) => (out += d));
    p.once("exit", (code) => (code === 0 ? resolve(out.trim()) : reject(new Error(`imgate token exited ${code}`))));
  });
  const states = await page.evaluate(async ({ wsUrl, short }) => {
    const { ImgateClient } = await import("/imgate.js");
    let first = true;
    const c = new ImgateClient({
      webSocketUrl: wsUrl,
      transports: ["websocket"],
      device: "t1",
      minDelayMs: 10,
      maxDelayMs: 20,
      token: async () => {
        if (first) {
          first = false;
          return short;
        }
        return (await (await fetch("/dev/token?user=tom&device=t1")).json()).token;
      },
    });
    const seen = [];
    const reopened = new Promise((resolve) =>
      c.addEventListener("status", (e) => {
        seen.push(e.detail.code ? `${e.detail.state} ${e.detail.code}` : e.detail.state);
        if (e.detail.state === "open" && seen.filter((s) => s === "open").length === 2) resolve();
      }),
    );
    c.connect();
    await reopened;
    c.close();
    return seen;
  }, { wsUrl: base.replace("http", "ws") + "/ws", short });
  assertEqual(states.slice(0, 5), ["connecting", "open", "reconnecting 4501", "connecting", "open"], "status changes");
});

async function main() {
  const gateway = await startGateway();
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
    ],
  });
  let failed = 0;
  try {
    for (const t of tests) {
      // Playwright starts Chromium on a fresh temporary profile; a fresh context per test
      // gives each its own localStorage too.
      const context = await browser.newContext();
      const started = Date.now();
      try {
        await within(t.fn({ context, base: gateway.base }), t.name, 60000);
        console.log(`ok   ${t.name} (${Date.now() - started} ms)`);
      } catch (e) {
        failed++;
        console.log(`FAIL ${t.name}: ${e.stack ?? e}`);
      } finally {
        await context.close();
      }
    }
  } finally {
    await browser.close();
    gateway.proc.kill("SIGTERM");
  }
  console.log(`browser tests: ${tests.length - failed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
