/**
 * The gateway in front of a real Python sidecar on the tiny model: one sidecar start-up for the
 * whole file.
 */
import { Metadata, status } from '@grpc/grpc-js';
import { startGateway, type Gateway } from '../src/gateway/server';
import { FinishReason, type ExamServiceClient } from '../src/gen/golem/exam/v1/exam';
import { describeSymbol, examClient, healthStatus, listServices, takeExam } from './support/grpc';
import { tinyConfig, tinyModels, type TinyModels } from './support/tiny-models';

process.env.HF_HUB_OFFLINE = '1';
const PROMPT = 'Instruction: Which genre is the hobbit?\nResponse:';

describe('gateway with a real sidecar', () => {
  let models: TinyModels;
  let gateway: Gateway;
  let client: ExamServiceClient;
  let direct: ExamServiceClient;

  beforeAll(async () => {
    models = tinyModels();
    gateway = await startGateway(tinyConfig(models));
    client = examClient(gateway.address);
    direct = examClient(gateway.sidecarAddress);
  });

  afterAll(async () => {
    client?.close();
    direct?.close();
    await gateway?.close();
  });

  it('answers with token counts, model and adapter info', async () => {
    const { response, error } = await takeExam(client, { prompt: PROMPT, maxNewTokens: 3 });
    expect(error).toBeUndefined();
    expect(typeof response?.answer).toBe('string');
    expect(response?.fullText.startsWith(PROMPT)).toBe(true);
    expect(response?.promptTokens).toBeGreaterThan(0);
    expect(response?.answerTokens).toBeGreaterThanOrEqual(1);
    expect(response?.answerTokens).toBeLessThanOrEqual(3);
    expect(response?.finishReason).not.toBe(FinishReason.FINISH_REASON_UNSPECIFIED);
    expect(response?.model).toMatchObject({ modelName: models.model, device: 'cpu' });
    expect(response?.adapter).toMatchObject({ path: models.adapter, peftType: 'LORA' });
  });

  it('fills fields left out from the daemon defaults', async () => {
    const { response, error } = await takeExam(client, {});
    expect(error).toBeUndefined();
    expect(response?.fullText.startsWith(PROMPT)).toBe(true);
    expect(response?.answerTokens).toBeLessThanOrEqual(4);
  });

  it('gives the same answer as the sidecar asked directly', async () => {
    const request = { prompt: PROMPT, maxNewTokens: 6, adapterPath: models.adapter_b };
    const viaGateway = await takeExam(client, request);
    const straight = await takeExam(direct, request);
    expect(viaGateway.error).toBeUndefined();
    expect(viaGateway.response?.answer).toBe(straight.response?.answer);
    expect(viaGateway.response?.adapter?.path).toBe(models.adapter_b);
  });

  it('passes NOT_FOUND for a missing adapter through with its details', async () => {
    const { error, details } = await takeExam(client, { adapterPath: '/no/such/adapter' });
    expect(error?.code).toBe(status.NOT_FOUND);
    expect(details).toMatchObject({ reason: 'ADAPTER_NOT_FOUND', domain: 'golem.dev' });
    expect(details?.fieldViolations.map((v) => v.field)).toEqual(['adapter_path']);
  });

  it("passes the sidecar's refusal of an invalid field through with its field violation", async () => {
    const { error, details } = await takeExam(client, { maxNewTokens: 100000 });
    expect(error?.code).toBe(status.INVALID_ARGUMENT);
    expect(details).toMatchObject({ reason: 'INVALID_FIELD', domain: 'golem.dev' });
    expect(details?.fieldViolations.map((v) => v.field)).toEqual(['max_new_tokens']);
  });

  it('keeps the caller x-request-id and sends it back', async () => {
    const metadata = new Metadata();
    metadata.set('x-request-id', 'test-request-42');
    const { headers } = await takeExam(client, { maxNewTokens: 1 }, metadata);
    expect(headers?.get('x-request-id')).toEqual(['test-request-42']);
  });

  it('makes up an x-request-id when the caller sent none', async () => {
    const { headers } = await takeExam(client, { maxNewTokens: 1 });
    expect(headers?.get('x-request-id')[0]).toMatch(/^[0-9a-f-]{36}$/);
  });

  // adapter_b runs greedily to 200 tokens on the tiny model: seconds of work on this CPU.
  // About 0.6 s of generation on an idle 2-core machine: well past the 300 ms deadlines below.
  const slowRequest = () => ({ maxNewTokens: 500, adapterPath: models.adapter_b });

  it('passes the caller deadline on, and the sidecar drops the abandoned work', async () => {
    const started = Date.now();
    const { error } = await takeExam(client, slowRequest(), new Metadata(), { deadline: Date.now() + 300 });
    expect(error?.code).toBe(status.DEADLINE_EXCEEDED);
    expect(Date.now() - started).toBeLessThan(2000);
    // Had the sidecar kept generating, this call would queue behind seconds of it.
    const next = await takeExam(client, { maxNewTokens: 1 });
    expect(next.error).toBeUndefined();
    expect(next.response?.timings?.queueNs ?? 0).toBeLessThan(1.5e9);
  });

  it('applies limits.requestTimeoutMs when the caller sets no deadline', async () => {
    const config = tinyConfig(models);
    const strict = await startGateway({
      ...config,
      sidecar: { ...config.sidecar, address: gateway.sidecarAddress },
      limits: { ...config.limits, requestTimeoutMs: 300 },
    });
    const strictClient = examClient(strict.address);
    try {
      // Its health follows the external sidecar's, which is serving.
      await waitFor(async () => (await healthStatus(strict.address, '')) === 'SERVING');
      const { error } = await takeExam(strictClient, slowRequest());
      expect(error?.code).toBe(status.DEADLINE_EXCEEDED);
      // The shared sidecar is still there for callers of the other gateway.
      expect((await takeExam(client, { maxNewTokens: 1 })).error).toBeUndefined();
    } finally {
      strictClient.close();
      await strict.close();
    }
  });

  it('reports SERVING for the server and the exam service', async () => {
    expect(await healthStatus(gateway.address, '')).toBe('SERVING');
    expect(await healthStatus(gateway.address, 'golem.exam.v1.ExamService')).toBe('SERVING');
  });

  it('lists its services through reflection', async () => {
    const services = await listServices(gateway.address);
    expect(services).toEqual(expect.arrayContaining(['golem.exam.v1.ExamService', 'grpc.health.v1.Health']));
    const files = await describeSymbol(gateway.address, 'golem.exam.v1.ExamService');
    expect(files.some((file) => file.toString('latin1').includes('TakeExamRequest'))).toBe(true);
  });
});

async function waitFor(condition: () => Promise<boolean>, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
