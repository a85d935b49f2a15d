/**
 * The gateway watching a real sidecar on the tiny model: SIGKILL it during long calls, and the
 * calls end at once with UNAVAILABLE, health drops, the sidecar comes back, and calls succeed;
 * SIGSTOP it, and its unanswered health checks get it killed and restarted the same way.
 */
import { status } from '@grpc/grpc-js';
import { startGateway, type Gateway } from '../src/gateway/server';
import type { ExamServiceClient } from '../src/gen/golem/exam/v1/exam';
import { captureLogs, type CapturedLogs } from './support/logs';
import { examClient, healthStatus, takeExam } from './support/grpc';
import { tinyConfig, tinyModels, type TinyModels } from './support/tiny-models';
import { waitFor } from './support/wait';

process.env.HF_HUB_OFFLINE = '1';

describe('sidecar supervision with a real sidecar', () => {
  let models: TinyModels;
  let logs: CapturedLogs;
  let gateway: Gateway;
  let client: ExamServiceClient;

  beforeAll(async () => {
    models = tinyModels();
    logs = captureLogs('info');
    const config = tinyConfig(models);
    gateway = await startGateway(
      { ...config, sidecar: { ...config.sidecar, restartBackoffMs: 100, restartBackoffMaxMs: 1000 } },
      { logger: logs.logger },
    );
    client = examClient(gateway.address);
  });

  afterAll(async () => {
    client?.close();
    await gateway?.close();
  });

  it('ends calls in flight with UNAVAILABLE at once when the sidecar is killed, then recovers', async () => {
    const firstPid = gateway.sidecarPid();
    expect(firstPid).toBeDefined();
    // Long generations (about 0.6 s each) queue on the sidecar's one worker: seconds of work.
    const long = { maxNewTokens: 500, adapterPath: models.adapter_b };
    const calls = [1, 2, 3, 4].map(() => takeExam(client, long));
    await new Promise((resolve) => setTimeout(resolve, 300));
    const killedAt = Date.now();
    process.kill(firstPid as number, 'SIGKILL');

    const results = await Promise.all(calls);
    expect(Date.now() - killedAt).toBeLessThan(1500);
    for (const { error, details } of results) {
      expect(error?.code).toBe(status.UNAVAILABLE);
      expect(details?.reason).toBe('SIDECAR_UNAVAILABLE');
    }
    expect(await healthStatus(gateway.address, '')).toBe('NOT_SERVING');
    expect(await healthStatus(gateway.address, 'golem.exam.v1.ExamService')).toBe('NOT_SERVING');
    // While it restarts, new calls are refused at once rather than left waiting.
    const during = await takeExam(client, { maxNewTokens: 1 });
    expect(during.error?.code).toBe(status.UNAVAILABLE);
    expect(during.details?.reason).toBe('SIDECAR_UNAVAILABLE');

    await waitFor(async () => (await healthStatus(gateway.address, '')) === 'SERVING', 90000, 'health SERVING again');
    expect(gateway.sidecarPid()).not.toBe(firstPid);
    const after = await takeExam(client, { maxNewTokens: 2 });
    expect(after.error).toBeUndefined();
    expect(after.response?.answerTokens).toBeGreaterThanOrEqual(1);

    const messages = logs.lines().map((line) => line.message);
    expect(messages).toEqual(expect.arrayContaining(['sidecar died', 'restarting sidecar', 'sidecar ready']));
    expect(logs.lines().find((line) => line.message === 'sidecar died')).toMatchObject({ how: 'signal SIGKILL' });
  });
});

describe('a wedged sidecar', () => {
  let models: TinyModels;
  let logs: CapturedLogs;
  let gateway: Gateway;
  let client: ExamServiceClient;
  let stoppedPid: number | undefined;

  beforeAll(async () => {
    models = tinyModels();
    logs = captureLogs('info');
    const config = tinyConfig(models);
    // Fast checks, so the test notices within seconds; the defaults take about 6 s.
    const sidecar = {
      ...config.sidecar,
      restartBackoffMs: 100,
      healthIntervalMs: 300,
      healthTimeoutMs: 300,
      healthFailures: 3,
    };
    gateway = await startGateway({ ...config, sidecar }, { logger: logs.logger });
    client = examClient(gateway.address);
  });

  afterAll(async () => {
    // Should the test fail before the gateway kills it, a stopped process must not linger.
    if (stoppedPid !== undefined) {
      try {
        process.kill(stoppedPid, 'SIGKILL');
      } catch {
        // Already gone, as it should be.
      }
    }
    client?.close();
    await gateway?.close();
  });

  it('is reported NOT_SERVING when its event loop stops answering, killed, restarted, and serves again', async () => {
    const pid = gateway.sidecarPid() as number;
    stoppedPid = pid;
    expect(await healthStatus(gateway.address, '')).toBe('SERVING');
    // SIGSTOP: the process is there (no exit event) and its socket still accepts, but nothing answers.
    process.kill(pid, 'SIGSTOP');

    await waitFor(async () => (await healthStatus(gateway.address, '')) === 'NOT_SERVING', 10000, 'health NOT_SERVING');
    await waitFor(async () => (await healthStatus(gateway.address, '')) === 'SERVING', 90000, 'health SERVING again');
    expect(gateway.sidecarPid()).not.toBe(pid);
    const after = await takeExam(client, { maxNewTokens: 2 });
    expect(after.error).toBeUndefined();
    expect(after.response?.answerTokens).toBeGreaterThanOrEqual(1);

    const unresponsive = logs.lines().find((line) => line.message === 'sidecar unresponsive: killing it');
    expect(unresponsive).toMatchObject({ pid });
    expect(unresponsive?.reason).toMatch(/unanswered 3 times in a row/);
    const died = logs.lines().find((line) => line.message === 'sidecar died');
    expect(died).toMatchObject({ pid, how: 'signal SIGKILL' });
    expect(died?.killed_because).toMatch(/^unresponsive: /);
  });
});
