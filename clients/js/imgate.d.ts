// Types for imgate.js (docs/protocol.md is the protocol behind them).

export interface ImgateOptions {
  /** `ws(s)://host/ws`. Needed for the WebSocket transport. */
  webSocketUrl?: string;
  /** `https://host:4433/wt`. Needed for the WebTransport transport. */
  webTransportUrl?: string;
  /** A token, or a function returning one (called before every connect: a fresh token
   * lets the client recover from 4501 by itself). */
  token: string | (() => string | Promise<string>);
  /** Stable per device: the server keeps this device's ack cursor under it. */
  device?: string;
  /** `ios`, `android`, `web`, `desktop` or `other`. */
  platform?: string;
  /** The user the token is for: keeps stored resume positions of different users apart. */
  user?: string;
  /** Transports in the order to try (default: WebTransport, then WebSocket). */
  transports?: Array<"webtransport" | "websocket">;
  /** Where to fetch SPEC §9's `/cert-hash` document, for self-signed development
   * certificates (WebTransport's `serverCertificateHashes`). */
  certHashUrl?: string;
  /** `sha256_b64` values to pass as `serverCertificateHashes` instead of fetching them. */
  serverCertificateHashes?: string[];
  /** Reconnect on 41xx and lost connections (default true). */
  reconnect?: boolean;
  /** Backoff bounds (defaults 500 ms and 30 s, full jitter). */
  minDelayMs?: number;
  maxDelayMs?: number;
  /** Keep the resume position in localStorage so a reload resumes (default true). */
  persist?: boolean;
}

export interface Push {
  type: "push";
  id: string;
  from?: string;
  kind?: string;
  /** A JSON value when the pushed bytes are UTF-8 JSON text. */
  body?: unknown;
  /** Otherwise the bytes, base64. */
  body_b64?: string;
  ts: number;
  /** Durable pushes only. */
  seq?: number;
  epoch?: string;
}

export interface Welcome {
  type: "welcome";
  session: string;
  user: string;
  device: string;
  platform: string;
  transport: "ws" | "wss" | "wt";
  instance: string;
  heartbeat_ms: number;
  max_frame: number;
  epoch: string;
  head_seq: number;
  cursor: number;
  token_expires_at_ms: number;
}

export interface Status {
  state: "connecting" | "open" | "reconnecting" | "closed";
  transport: "webtransport" | "websocket" | null;
  /** The close code that ended the last connection (`kick` when one came). */
  code?: number;
  reason?: string;
  delayMs?: number;
  attempt?: number;
  welcome?: Welcome;
}

export interface ImgateEventMap {
  status: CustomEvent<Status>;
  push: CustomEvent<Push>;
  synced: CustomEvent<{ epoch: string; seq: number; replayed: number; complete: boolean }>;
  reply: CustomEvent<{ id: string; ok: boolean; body?: unknown; code?: string; message?: string }>;
  kick: CustomEvent<{ code: number; reason: string }>;
  servererror: CustomEvent<{ code: string; message: string; id?: string }>;
  /** WebTransport could not connect and WebSocket is used instead. */
  fallback: CustomEvent<{ from: "webtransport"; error: string }>;
}

export declare class ImgateClient extends EventTarget {
  constructor(options: ImgateOptions);
  readonly state: Status["state"] | "idle";
  readonly transport: Status["transport"];
  readonly welcome: Welcome | null;
  /** The resume position held (`<epoch>:<seq>`), or null. */
  readonly since: string | null;
  connect(): void;
  close(): void;
  /** Resolves with the reply's body; rejects with an Error with `code`. */
  send(msg: { to?: string; group?: string; kind?: string; body: unknown }): Promise<unknown>;
  addEventListener<K extends keyof ImgateEventMap>(
    type: K,
    listener: (ev: ImgateEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
}

export declare function shouldReconnect(code: number): boolean;
export declare function backoffDelay(attempt: number, minMs?: number, maxMs?: number, random?: () => number): number;
export declare class FrameReader {
  constructor(maxFrame?: number);
  push(chunk: Uint8Array): Uint8Array[];
}
export declare function frameBytes(payload: Uint8Array): Uint8Array;
