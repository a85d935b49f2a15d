/**
 * Error paths a real sidecar will not show on demand, with a fake one (tests/support/fake-sidecar.ts):
 * a sidecar that accepts calls and never answers, and one that dies at every start after the first.
 */
import { Metadata, status } from '@grpc/grpc-js';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadConfig, type GolemConfig } from '../src/config';
import { startGateway, type Gateway } from '../src/gateway/server';
import type { ExamServiceClient } from '../src/gen/golem/exam/v1/exam';
import { fakeSidecarPython, type FakeSidecarMode } from './support/fake-sidecar-command';
import { examClient, healthStatus, takeExam } from './support/grpc';
import { captureLogs, type CapturedLogs } from './support/logs';
import { waitFor } from './support/wait';

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'golem-faults-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function fakeConfig(mode: FakeSidecarMode, edit: (config: GolemConfig) => GolemConfig): GolemConfig {
  const config = loadConfig({ env: {} });
  return edit({
    ...config,
    listen: '127.0.0.1:0',
    sidecar: { ...config.sidecar, python: fakeSidecarPython(dir, mode), startTimeoutMs: 20000 },
  });
}

describe('a sidecar that accepts calls and never answers', () => {
  const REQUEST_TIMEOUT_MS = 800;
  let gateway: Gateway;
  let client: ExamServiceClient;

  beforeAll(async () => {
    const config = fakeConfig('hang', (c) => ({
      ...c,
      limits: { ...c.limits, requestTimeoutMs: REQUEST_TIMEOUT_MS, shutdownGraceMs: 300 },
    }));
    gateway = await startGateway(config, { logger: captureLogs().logger });
    client = examClient(gateway.address);
  });

  afterAll(async () => {
    client?.close();
    await gateway?.close();
  });

  it("ends the call at the caller's deadline with DEADLINE_EXCEEDED", async () => {
    const started = Date.now();
    const { error } = await takeExam(client, { prompt: 'hello' }, new Metadata(), { deadline: Date.now() + 400 });
    const took = Date.now() - started;
    expect(error?.code).toBe(status.DEADLINE_EXCEEDED);
    expect(took).toBeGreaterThanOrEqual(350);
    expect(took).toBeLessThan(REQUEST_TIMEOUT_MS);
  });

  it('ends a call without a deadline at limits.requestTimeoutMs, with an ErrorInfo', async () => {
    const started = Date.now();
    const { error, details } = await takeExam(client, { prompt: 'hello' });
    const took = Date.now() - started;
    expect(error?.code).toBe(status.DEADLINE_EXCEEDED);
    expect(details?.reason).toBe('DEADLINE_EXCEEDED');
    expect(took).toBeGreaterThanOrEqual(REQUEST_TIMEOUT_MS - 50);
    expect(took).toBeLessThan(REQUEST_TIMEOUT_MS + 1500);
  });

  it('still answers health and new calls after the hung ones', async () => {
    expect(await healthStatus(gateway.address, '')).toBe('SERVING');
    // The gateway judges no fields: even a bad request reaches the (hung) sidecar and times out.
    const { error } = await takeExam(client, { maxNewTokens: 0 });
    expect(error?.code).toBe(status.DEADLINE_EXCEEDED);
  });

  it('on close, ends a call still running after limits.shutdownGraceMs with UNAVAILABLE SHUTTING_DOWN', async () => {
    const hung = takeExam(client, { prompt: 'hello' }, new Metadata(), { deadline: Date.now() + 30000 });
    await new Promise((resolve) => setTimeout(resolve, 200));
    const started = Date.now();
    await gateway.close();
    const { error, details } = await hung;
    expect(error?.code).toBe(status.UNAVAILABLE);
    expect(details?.reason).toBe('SHUTTING_DOWN');
    expect(Date.now() - started).toBeLessThan(3000);
  });
});

describe('a sidecar that dies at every start after the first', () => {
  let logs: CapturedLogs;
  let gateway: Gateway;
  let client: ExamServiceClient;
  let gaveUp: Promise<string>;

  beforeAll(async () => {
    logs = captureLogs('info');
    const config = fakeConfig('serve-once', (c) => ({
      ...c,
      sidecar: { ...c.sidecar, maxRestarts: 3, restartBackoffMs: 50, restartBackoffMaxMs: 400 },
    }));
    let onSidecarFailed: (reason: string) => void = () => undefined;
    gaveUp = new Promise((resolve) => {
      onSidecarFailed = resolve;
    });
    gateway = await startGateway(config, { logger: logs.logger, onSidecarFailed });
    client = examClient(gateway.address);
  });

  afterAll(async () => {
    client?.close();
    await gateway?.close();
  });

  it('ends the call in flight with UNAVAILABLE, retries with backoff, then gives up and says why', async () => {
    const hung = takeExam(client, { prompt: 'hello' });
    await new Promise((resolve) => setTimeout(resolve, 200));
    const killedAt = Date.now();
    process.kill(gateway.sidecarPid() as number, 'SIGKILL');
    const { error, details } = await hung;
    expect(Date.now() - killedAt).toBeLessThan(1000);
    expect(error?.code).toBe(status.UNAVAILABLE);
    expect(details?.reason).toBe('SIDECAR_UNAVAILABLE');

    const reason = await gaveUp;
    expect(reason).toMatch(/3 failed starts in a row, sidecar\.maxRestarts/);
    expect(reason).toContain('the model file is gone');
    expect(await healthStatus(gateway.address, '')).toBe('NOT_SERVING');
    const refused = await takeExam(client, { prompt: 'hello' });
    expect(refused.error?.code).toBe(status.UNAVAILABLE);
    expect(refused.details?.reason).toBe('SIDECAR_UNAVAILABLE');
    expect(refused.error?.details).toContain('could not be restarted');

    const restarts = logs.lines().filter((line) => line.message === 'restarting sidecar');
    expect(restarts.map((line) => [line.attempt, line.in_ms])).toEqual([
      [1, 50],
      [2, 100],
      [3, 200],
    ]);
    expect(logs.lines().filter((line) => line.message === 'sidecar restart failed')).toHaveLength(3);
    expect(logs.lines().find((line) => line.message === 'sidecar given up')).toMatchObject({ reason });
  });

  it('keeps answering health while given up', async () => {
    await waitFor(async () => (await healthStatus(gateway.address, 'golem.exam.v1.ExamService')) === 'NOT_SERVING');
  });
});
