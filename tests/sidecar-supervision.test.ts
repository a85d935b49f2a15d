/**
 * The gateway watching a real sidecar on the tiny model: SIGKILL it during long calls, and the
 * calls end at once with UNAVAILABLE, health drops, the sidecar comes back, and calls succeed.
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
