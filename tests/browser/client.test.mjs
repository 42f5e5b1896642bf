// Unit tests of clients/js/imgate.js's pure parts, in Node: `node --test tests/browser/`.

import { test } from "node:test";
import assert from "node:assert/strict";
import { FrameReader, frameBytes, backoffDelay, shouldReconnect } from "../../clients/js/imgate.js";

const enc = new TextEncoder();

test("frames split on their length prefix, across chunk boundaries", () => {
  const a = frameBytes(enc.encode('{"type":"pong"}'));
  const b = frameBytes(new Uint8Array(0));
  const c = frameBytes(enc.encode("xyz"));
  const all = new Uint8Array([...a, ...b, ...c]);
  for (let cut = 0; cut <= all.length; cut++) {
    const r = new FrameReader();
    const frames = [...r.push(all.slice(0, cut)), ...r.push(all.slice(cut))];
    assert.deepEqual(
      frames.map((f) => new TextDecoder().decode(f)),
      ['{"type":"pong"}', "", "xyz"],
      `cut at ${cut}`,
    );
  }
});

test("a length over the maximum is refused before the body arrives", () => {
  const r = new FrameReader(16);
  assert.throws(() => r.push(new Uint8Array([0, 0, 0, 17])));
});

test("41xx and lost connections reconnect, 45xx do not", () => {
  for (const code of [0, 1000, 1006, 4100, 4101, 4102, 4103, 4104]) assert.equal(shouldReconnect(code), true, `${code}`);
  for (const code of [4500, 4501, 4502, 4503, 4504, 4505, 4507]) assert.equal(shouldReconnect(code), false, `${code}`);
});

test("backoff grows to its cap, with full jitter", () => {
  assert.equal(backoffDelay(0, 500, 30000, () => 0), 500);
  assert.equal(backoffDelay(3, 500, 30000, () => 1), 4000);
  assert.equal(backoffDelay(30, 500, 30000, () => 1), 30000);
  const d = backoffDelay(5, 500, 30000, () => 0.5);
  assert.ok(d > 500 && d < 16000);
});
