/**
 * The gateway's validation through a real server whose sidecar address leads nowhere: refused
 * requests come back INVALID_ARGUMENT (they never reached the sidecar, which would have made them
 * UNAVAILABLE), and everything else is forwarded.
 */
import { status } from '@grpc/grpc-js';
import fc from 'fast-check';
import os from 'node:os';
import path from 'node:path';
import { loadConfig } from '../src/config';
import { startGateway, type Gateway } from '../src/gateway/server';
import { validateTakeExam } from '../src/gateway/validation';
import type { ExamServiceClient, TakeExamRequest } from '../src/gen/golem/exam/v1/exam';
import { examClient, healthStatus, takeExam } from './support/grpc';

describe('gateway validation, sidecar unreachable', () => {
  const config = loadConfig({ env: {} });
  let gateway: Gateway;
  let client: ExamServiceClient;

  beforeAll(async () => {
    const nowhere = `unix:${path.join(os.tmpdir(), `golem-no-sidecar-${process.pid}.sock`)}`;
    gateway = await startGateway(
      { ...config, logLevel: 'error', sidecar: { ...config.sidecar, address: nowhere } },
      { listen: '127.0.0.1:0' },
    );
    client = examClient(gateway.address);
  });

  afterAll(async () => {
    client.close();
    await gateway.close();
  });

  it('refuses a bad field with INVALID_ARGUMENT, ErrorInfo and a field violation', async () => {
    const { error, details } = await takeExam(client, { maxNewTokens: 0, prompt: ' ' });
    expect(error?.code).toBe(status.INVALID_ARGUMENT);
    expect(details).toMatchObject({
      reason: 'INVALID_FIELD',
      domain: 'golem.dev',
      fieldViolations: [
        { field: 'prompt', description: 'must not be blank when set' },
        { field: 'max_new_tokens', description: 'must be between 1 and 512, got 0' },
      ],
    });
  });

  it('forwards a valid request, and says the sidecar is unavailable', async () => {
    const { error, details } = await takeExam(client, { prompt: 'hello' });
    expect(error?.code).toBe(status.UNAVAILABLE);
    expect(details?.reason).toBe('SIDECAR_UNAVAILABLE');
  });

  it('reports NOT_SERVING while the sidecar is not serving', async () => {
    expect(await healthStatus(gateway.address, '')).toBe('NOT_SERVING');
    expect(await healthStatus(gateway.address, 'golem.exam.v1.ExamService')).toBe('NOT_SERVING');
  });

  it('property: random requests are refused with violations or forwarded, never anything else', async () => {
    const text = fc.option(fc.oneof(fc.string(), fc.constantFrom('', '  ', 'x')), { nil: undefined });
    const arbitraryRequest: fc.Arbitrary<TakeExamRequest> = fc.record({
      modelName: text,
      adapterPath: text,
      prompt: text,
      maxNewTokens: fc.option(fc.integer({ min: -5, max: 600 }), { nil: undefined }),
      device: fc.option(fc.constantFrom('auto', 'cpu', 'cuda', 'cuda:0', 'mps', 'gpu', ''), { nil: undefined }),
      quantization: fc.option(
        fc.record({
          loadIn4bit: fc.option(fc.boolean(), { nil: undefined }),
          bnb4bitComputeDtype: fc.option(fc.constantFrom('float16', 'torch.bfloat16', 'int8', ''), { nil: undefined }),
        }),
        { nil: undefined },
      ),
      expectedAnswer: text,
      disableAdapter: fc.boolean(),
      stop: fc.constant<string[]>([]),
    });
    await fc.assert(
      fc.asyncProperty(arbitraryRequest, async (request) => {
        const { error, details } = await takeExam(client, request);
        const expected = validateTakeExam(request, config.limits);
        if (expected.length > 0) {
          expect(error?.code).toBe(status.INVALID_ARGUMENT);
          expect(details?.fieldViolations).toEqual(expected);
        } else {
          expect(error?.code).toBe(status.UNAVAILABLE);
        }
      }),
      { numRuns: 60 },
    );
  });
});
