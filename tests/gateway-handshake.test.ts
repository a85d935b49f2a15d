/**
 * The gateway's handshake timeout (limits.handshakeTimeoutMs): a TCP connection that sends
 * nothing, or only part of the HTTP/2 preface, is closed once the timeout passes; a real client's
 * connection is left alone, however long it stays open. The sidecar is the fake one: only the
 * gateway's port is under test.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { loadConfig } from '../src/config';
import { startGateway, type Gateway } from '../src/gateway/server';
import { fakeSidecarPython } from './support/fake-sidecar-command';
import { healthStatus, watchHealth, type HealthWatch } from './support/grpc';
import { captureLogs } from './support/logs';
import { sleep, waitFor } from './support/wait';

const HANDSHAKE_TIMEOUT_MS = 500;

describe('handshake timeout', () => {
  let dir: string;
  let gateway: Gateway;
  let watch: HealthWatch | undefined;

  beforeAll(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-handshake-'));
    const config = loadConfig({ env: {} });
    gateway = await startGateway(
      {
        ...config,
        listen: '127.0.0.1:0',
        sidecar: { ...config.sidecar, python: fakeSidecarPython(dir, 'hang'), startTimeoutMs: 20000 },
        limits: { ...config.limits, handshakeTimeoutMs: HANDSHAKE_TIMEOUT_MS, shutdownGraceMs: 300 },
      },
      { logger: captureLogs('warn').logger },
    );
  });

  afterAll(async () => {
    watch?.cancel();
    await gateway?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  /** Opens a raw TCP connection to the gateway, writes `bytes`, and times how long it stays open. */
  async function rawConnection(bytes: string): Promise<{ socket: Socket; closedAfterMs: Promise<number> }> {
    const socket = connect(gateway.port, '127.0.0.1');
    await new Promise((resolve) => socket.once('connect', resolve));
    const opened = Date.now();
    socket.on('error', () => undefined);
    // Read (and drop) what the server sends, its SETTINGS frame: a paused socket never sees the end.
    socket.resume();
    if (bytes) socket.write(bytes);
    const closedAfterMs = new Promise<number>((resolve) => socket.once('close', () => resolve(Date.now() - opened)));
    return { socket, closedAfterMs };
  }

  it('closes a connection that sends nothing, and one that stops inside the preface, after the timeout', async () => {
    const silent = await rawConnection('');
    const partial = await rawConnection('PRI * HTTP/2.0\r\n');
    for (const { socket, closedAfterMs } of [silent, partial]) {
      const after = await Promise.race([closedAfterMs, sleep(HANDSHAKE_TIMEOUT_MS * 6).then(() => -1)]);
      socket.destroy();
      expect(after).toBeGreaterThanOrEqual(HANDSHAKE_TIMEOUT_MS - 50);
      expect(after).toBeLessThan(HANDSHAKE_TIMEOUT_MS * 4);
    }
  });

  it('leaves a real client connection open well past the timeout, and keeps serving it', async () => {
    watch = watchHealth(gateway.address, '');
    await waitFor(() => watch?.statuses.includes('SERVING') ?? false, 10000, 'health watch SERVING');
    let ended = false;
    void watch.ended.then(() => (ended = true));
    // A silent connection alongside, closed meanwhile, must not disturb the client.
    const silent = await rawConnection('');
    await sleep(HANDSHAKE_TIMEOUT_MS * 4);
    expect(await silent.closedAfterMs).toBeLessThan(HANDSHAKE_TIMEOUT_MS * 4);
    // The watch is one stream on one connection: had the connection been closed, it would have ended.
    expect(ended).toBe(false);
    expect(await healthStatus(gateway.address, '')).toBe('SERVING');
  });
});
