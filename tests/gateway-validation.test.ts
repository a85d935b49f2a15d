/**
 * The sidecar owns every semantic check; the gateway only forwards. Through a gateway whose
 * sidecar address leads nowhere, even a bad request comes back UNAVAILABLE (nothing refused it on
 * the way). Through a gateway in front of the real sidecar on the tiny model, random requests get
 * only documented codes, each with its ErrorInfo, and the daemon keeps serving.
 */
import { status } from '@grpc/grpc-js';
import { create, toBinary } from '@bufbuild/protobuf';
import fc from 'fast-check';
import os from 'node:os';
import path from 'node:path';
import { messageDescriptor } from '../src/contract';
import { loadConfig } from '../src/config';
import { startGateway, type Gateway } from '../src/gateway/server';
import {
  ExamServiceService,
  TakeExamResponse,
  type ExamServiceClient,
  type TakeExamRequest,
} from '../src/gen/golem/exam/v1/exam';
import { examClient, healthStatus, rawCall, takeExam } from './support/grpc';
import { tinyConfig, tinyModels, type TinyModels } from './support/tiny-models';

process.env.HF_HUB_OFFLINE = '1';

describe('gateway, sidecar unreachable', () => {
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

  it('does not judge fields itself: a bad request is forwarded, and the sidecar is unavailable', async () => {
    for (const request of [{ maxNewTokens: 0, prompt: ' ' }, { prompt: 'hello' }]) {
      const { error, details } = await takeExam(client, request);
      expect(error?.code).toBe(status.UNAVAILABLE);
      expect(details).toMatchObject({ reason: 'SIDECAR_UNAVAILABLE', domain: 'golem.dev' });
    }
  });

  it('reports NOT_SERVING while the sidecar is not serving, and liveness SERVING all the same', async () => {
    expect(await healthStatus(gateway.address, '')).toBe('NOT_SERVING');
    expect(await healthStatus(gateway.address, 'golem.exam.v1.ExamService')).toBe('NOT_SERVING');
    // The gateway answers: a liveness probe must not restart it for its sidecar's sake.
    expect(await healthStatus(gateway.address, 'liveness')).toBe('SERVING');
  });
});

// What the README documents a request may get; INTERNAL, UNKNOWN or UNAVAILABLE would be a bug.
const DOCUMENTED = new Set([
  status.OK,
  status.INVALID_ARGUMENT,
  status.NOT_FOUND,
  status.FAILED_PRECONDITION,
  status.PERMISSION_DENIED,
  status.RESOURCE_EXHAUSTED,
]);

describe('gateway in front of the real sidecar', () => {
  let models: TinyModels;
  let gateway: Gateway;
  let client: ExamServiceClient;

  beforeAll(async () => {
    models = tinyModels();
    gateway = await startGateway(tinyConfig(models));
    client = examClient(gateway.address);
  });

  afterAll(async () => {
    client?.close();
    await gateway?.close();
  });

  it('property: random requests get documented codes with an ErrorInfo, and the daemon keeps serving', async () => {
    const text = fc.option(fc.oneof(fc.string({ maxLength: 12 }), fc.constantFrom('', '  ', 'x', '\u0000')), {
      nil: undefined,
    });
    const arbitraryRequest: fc.Arbitrary<Partial<TakeExamRequest>> = fc.record({
      modelName: text,
      adapterPath: text,
      prompt: text,
      maxNewTokens: fc.option(fc.constantFrom(-5, 0, 1, 2, 513, 100000), { nil: undefined }),
      device: fc.option(fc.constantFrom('auto', 'cpu', 'cuda', 'cuda:0', 'mps', 'gpu', ''), { nil: undefined }),
      quantization: fc.option(
        fc.record({
          loadIn4bit: fc.option(fc.boolean(), { nil: undefined }),
          bnb4bitComputeDtype: fc.option(fc.constantFrom('float16', 'torch.bfloat16', 'int8', ''), { nil: undefined }),
          bnb4bitQuantType: fc.option(fc.constantFrom('nf4', 'fp4', 'NF4', 'nf8', ''), { nil: undefined }),
          bnb4bitUseDoubleQuant: fc.option(fc.boolean(), { nil: undefined }),
          // Output only: ignored in requests.
          effectiveComputeDtype: fc.constantFrom('', 'bfloat16'),
        }),
        { nil: undefined },
      ),
      expectedAnswer: text,
      disableAdapter: fc.boolean(),
      temperature: fc.option(fc.constantFrom(-1, 0, 0.7, 101, Number.NaN), { nil: undefined }),
      topP: fc.option(fc.constantFrom(0, 0.5, 1, 2), { nil: undefined }),
      topK: fc.option(fc.constantFrom(-1, 0, 5), { nil: undefined }),
      stop: fc.array(fc.string({ maxLength: 3 }), { maxLength: 10 }),
      adapterName: fc.option(fc.constantFrom('genres', '2bad', ''), { nil: undefined }),
    });
    await fc.assert(
      fc.asyncProperty(arbitraryRequest, async (request) => {
        const { error, details } = await takeExam(client, request);
        const code = error?.code ?? status.OK;
        expect({ code: status[code], documented: DOCUMENTED.has(code) }).toEqual({
          code: status[code],
          documented: true,
        });
        if (!error) return;
        expect(details?.domain).toBe('golem.dev');
        expect(details?.reason).toMatch(/^[A-Z][A-Z0-9_]+$/);
        if (code === status.INVALID_ARGUMENT) expect(details?.fieldViolations).toHaveLength(1);
      }),
      { numRuns: 25 },
    );
    const { error } = await takeExam(client, { maxNewTokens: 1 });
    expect(error).toBeUndefined();
    expect(await healthStatus(gateway.address, '')).toBe('SERVING');
  });

  it('passes a uint64 seed of 2^64-1 to the sidecar exactly, never re-encoding it', async () => {
    const desc = messageDescriptor('golem.exam.v1.TakeExamRequest');
    const request = (seed: bigint): Buffer =>
      Buffer.from(
        toBinary(
          desc,
          create(desc, {
            seed,
            temperature: 1.5,
            maxNewTokens: 8,
            prompt: 'Instruction: Which genre is dune?\nResponse:',
          }),
        ),
      );
    const top = request(2n ** 64n - 1n);
    const path = ExamServiceService.takeExam.path;
    const viaGateway = await rawCall(gateway.address, path, top);
    const direct = await rawCall(gateway.sidecarAddress, path, top);
    expect(viaGateway.error).toBeUndefined();
    expect(direct.error).toBeUndefined();
    const answer = (bytes?: Buffer): string | undefined => bytes && TakeExamResponse.decode(bytes).answer;
    // The same seed gives the same sampled answer: the sidecar got the same bytes.
    expect(answer(viaGateway.messages[0])).toBe(answer(direct.messages[0]));
  });
});
