/**
 * `golem serve` as a real process: graceful shutdown on SIGTERM (with a real sidecar, and with a
 * fake one that never answers, to reach the end of the grace period), and a non-zero exit when
 * its sidecar cannot be kept alive.
 */
import { status } from '@grpc/grpc-js';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { GolemConfig } from '../src/config';
import { buildCli, serve, sidecarPid, stopDaemon, type Daemon } from './support/daemon';
import { fakeSidecarPython } from './support/fake-sidecar-command';
import { examClient, takeExam, watchHealth } from './support/grpc';
import { tinyConfig, tinyModels, type TinyModels } from './support/tiny-models';
import { waitFor } from './support/wait';

describe('golem serve lifecycle', () => {
  let models: TinyModels;
  let dir: string;
  let daemon: Daemon | undefined;

  beforeAll(() => {
    buildCli();
    models = tinyModels();
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-serve-'));
  });

  afterEach(async () => {
    await stopDaemon(daemon);
    daemon = undefined;
  });

  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  function writeConfig(name: string, edit: (config: GolemConfig) => GolemConfig): string {
    const file = path.join(dir, name);
    // Debug level: the tests follow the daemon through its log lines, calls by "call started".
    writeFileSync(file, JSON.stringify(edit({ ...tinyConfig(models), logLevel: 'debug' })));
    return file;
  }

  const logged = (message: string) => () => daemon?.lines.some((line) => line.message === message) ?? false;

  it('on SIGTERM goes NOT_SERVING, refuses new calls, lets the call in flight finish, exits 0', async () => {
    daemon = serve(writeConfig('graceful.json', (c) => ({ ...c, limits: { ...c.limits, shutdownGraceMs: 30000 } })));
    const address = await daemon.ready;
    const pid = sidecarPid(daemon);
    const health = watchHealth(address, '');
    const client = examClient(address);
    await waitFor(() => health.statuses.includes('SERVING'));

    // About 0.6 s of generation: still running when the signal comes.
    const long = takeExam(client, { maxNewTokens: 500, adapterPath: models.adapter_b });
    await waitFor(logged('call started'));
    daemon.child.kill('SIGTERM');
    await waitFor(logged('gateway shutting down'));
    const late = examClient(address);
    const refused = await takeExam(late, { maxNewTokens: 1 });
    late.close();

    const { response, error } = await long;
    client.close();
    expect(error).toBeUndefined();
    expect(response?.answerTokens).toBeGreaterThan(0);
    expect(refused.error?.code).toBe(status.UNAVAILABLE);
    expect(await daemon.exited).toBe(0);
    await health.ended;
    expect(health.statuses[health.statuses.length - 1]).toBe('NOT_SERVING');
    // The call really was running when the signal came.
    expect(daemon.lines.find((line) => line.message === 'gateway shutting down')).toMatchObject({ calls_in_flight: 1 });
    expect(daemon.lines.some((line) => line.message === 'sidecar stopped')).toBe(true);
    expect(() => process.kill(pid, 0)).toThrow();
  });

  it('ends calls still running when the grace period is over with UNAVAILABLE SHUTTING_DOWN, exits 0', async () => {
    const file = writeConfig('short-grace.json', (c) => ({
      ...c,
      sidecar: { ...c.sidecar, python: fakeSidecarPython(dir, 'hang') },
      limits: { ...c.limits, shutdownGraceMs: 500 },
    }));
    daemon = serve(file);
    const client = examClient(await daemon.ready);
    const calls = [1, 2].map(() => takeExam(client, { prompt: 'hello' }));
    await waitFor(() => (daemon?.lines.filter((line) => line.message === 'call started').length ?? 0) >= 2);
    const signalled = Date.now();
    daemon.child.kill('SIGTERM');
    for (const { error, details } of await Promise.all(calls)) {
      expect(error?.code).toBe(status.UNAVAILABLE);
      expect(details?.reason).toBe('SHUTTING_DOWN');
    }
    client.close();
    expect(await daemon.exited).toBe(0);
    expect(Date.now() - signalled).toBeLessThan(8000);
    expect(daemon.lines.find((line) => line.message === 'shutdown grace over: calls in flight ended')).toMatchObject({
      calls: 2,
    });
  });

  it('exits 5 when its sidecar dies and cannot be restarted, saying why', async () => {
    const file = writeConfig('crash-loop.json', (c) => ({
      ...c,
      sidecar: { ...c.sidecar, python: fakeSidecarPython(dir, 'serve-once'), maxRestarts: 2, restartBackoffMs: 50 },
    }));
    daemon = serve(file);
    await daemon.ready;
    process.kill(sidecarPid(daemon), 'SIGKILL');
    expect(await daemon.exited).toBe(5);
    expect(daemon.stderr()).toMatch(/golem: error: the sidecar died and could not be restarted \(2 failed starts/);
    expect(daemon.lines.find((line) => line.message === 'sidecar given up')).toBeDefined();
  });
});
