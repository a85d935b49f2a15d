/**
 * StreamExam, the adapter registry and CompareAdapters through the gateway, in front of a real
 * Python sidecar on the tiny model; and the sidecar's backpressure passing through unchanged.
 */
import { status } from '@grpc/grpc-js';
import { DETAILS_KEY } from '../src/wire';
import { startGateway, type Gateway } from '../src/gateway/server';
import type {
  CompareAdaptersRequest,
  CompareAdaptersResponse,
  ExamServiceClient,
  ListAdaptersRequest,
  ListAdaptersResponse,
  LoadAdapterRequest,
  LoadAdapterResponse,
} from '../src/gen/golem/exam/v1/exam';
import { Status } from '../src/gen/google/rpc/status';
import { examClient, streamExam, takeExam, unaryCall } from './support/grpc';
import { tinyConfig, tinyModels, type TinyModels } from './support/tiny-models';

process.env.HF_HUB_OFFLINE = '1';
const PROMPT = 'Instruction: Which genre is the hobbit?\nResponse:';

describe('gateway streaming and adapter registry with a real sidecar', () => {
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

  it('streams text chunks that add up to the unary answer, then the final response', async () => {
    const request = { prompt: PROMPT, maxNewTokens: 8, adapterPath: models.adapter_b };
    const unary = await takeExam(client, request);
    const streamed = await streamExam(client, request);
    expect(unary.error).toBeUndefined();
    expect(streamed.error).toBeUndefined();
    expect(streamed.texts.join('')).toBe(unary.response?.answer);
    expect(streamed.final?.answer).toBe(unary.response?.answer);
    expect(streamed.final?.answerTokens).toBe(unary.response?.answerTokens);
  });

  it('refuses an invalid sampling field on a stream with a field violation', async () => {
    const { error, details } = await streamExam(client, { topP: 0 });
    expect(error?.code).toBe(status.INVALID_ARGUMENT);
    expect(details?.fieldViolations.map((v) => v.field)).toEqual(['top_p']);
  });

  it('keeps serving after a caller cancels a stream midway', async () => {
    const slow = { maxNewTokens: 500, adapterPath: models.adapter_b };
    const cancelled = await streamExam(client, slow, (_chunk, cancel) => cancel());
    expect(cancelled.error?.code).toBe(status.CANCELLED);
    expect(cancelled.final).toBeUndefined();
    // Had the sidecar kept generating, this call would queue behind seconds of it.
    const request = { prompt: PROMPT, maxNewTokens: 4 };
    const [next, again] = [await takeExam(client, request), await streamExam(client, request)];
    expect(next.error).toBeUndefined();
    expect(next.response?.timings?.queueNs ?? 0).toBeLessThan(1.5e9);
    expect(again.texts.join('')).toBe(next.response?.answer);
  });

  it('loads a named adapter, answers with it, lists it, unloads it, then NOT_FOUND', async () => {
    const load = await unaryCall<LoadAdapterRequest, LoadAdapterResponse>((r, m, cb) => client.loadAdapter(r, m, cb), {
      name: 'genre_b',
      adapterPath: models.adapter_b,
    });
    expect(load.error).toBeUndefined();
    expect(load.response?.adapter).toMatchObject({ name: 'genre_b', adapter: { path: models.adapter_b } });

    const byName = await takeExam(client, { prompt: PROMPT, maxNewTokens: 6, adapterName: 'genre_b' });
    const byPath = await takeExam(client, { prompt: PROMPT, maxNewTokens: 6, adapterPath: models.adapter_b });
    expect(byName.error).toBeUndefined();
    expect(byName.response?.answer).toBe(byPath.response?.answer);

    const listed = await unaryCall<ListAdaptersRequest, ListAdaptersResponse>(
      (r, m, cb) => client.listAdapters(r, m, cb),
      {},
    );
    expect(listed.response?.adapters.map((a) => a.name)).toContain('genre_b');

    const unload = await unaryCall((r, m, cb) => client.unloadAdapter(r, m, cb), { name: 'genre_b' });
    expect(unload.error).toBeUndefined();
    const gone = await takeExam(client, { prompt: PROMPT, maxNewTokens: 2, adapterName: 'genre_b' });
    expect(gone.error?.code).toBe(status.NOT_FOUND);
    expect(gone.details?.domain).toBe('golem.dev');
  });

  it('compares base and adapters with answers equal to single TakeExam answers', async () => {
    const maxNewTokens = 5;
    const { response, error } = await unaryCall<CompareAdaptersRequest, CompareAdaptersResponse>(
      (r, m, cb) => client.compareAdapters(r, m, cb),
      {
        prompts: [PROMPT],
        adapters: [models.adapter, models.adapter_b],
        maxNewTokens,
      },
    );
    expect(error).toBeUndefined();
    const answers = response?.comparisons[0].answers ?? [];
    expect(answers.map((a) => a.model)).toEqual(['__base__', models.adapter, models.adapter_b]);
    const base = await takeExam(client, { prompt: PROMPT, maxNewTokens, disableAdapter: true });
    const a = await takeExam(client, { prompt: PROMPT, maxNewTokens, adapterPath: models.adapter });
    const b = await takeExam(client, { prompt: PROMPT, maxNewTokens, adapterPath: models.adapter_b });
    expect(answers.map((x) => x.answer)).toEqual([base, a, b].map((r) => r.response?.answer));
  });

  it('passes the sidecar registry errors through with their details', async () => {
    const { error, details } = await unaryCall((r, m, cb) => client.unloadAdapter(r, m, cb), { name: 'never_loaded' });
    expect(error?.code).toBe(status.NOT_FOUND);
    expect(details?.domain).toBe('golem.dev');
  });
});

describe('gateway backpressure from the sidecar', () => {
  let gateway: Gateway;
  let client: ExamServiceClient;
  let models: TinyModels;

  beforeAll(async () => {
    models = tinyModels();
    const config = tinyConfig(models);
    gateway = await startGateway({ ...config, limits: { ...config.limits, maxQueue: 1, maxBatchSize: 1 } });
    client = examClient(gateway.address);
  });

  afterAll(async () => {
    client?.close();
    await gateway?.close();
  });

  it('passes RESOURCE_EXHAUSTED through with its RetryInfo', async () => {
    const slow = { maxNewTokens: 200, adapterPath: models.adapter_b };
    const results = await Promise.all(Array.from({ length: 5 }, () => takeExam(client, slow)));
    const refused = results.filter((r) => r.error?.code === status.RESOURCE_EXHAUSTED);
    expect(refused.length).toBeGreaterThan(0);
    const raw = refused[0].error?.metadata.get(DETAILS_KEY)[0] as Buffer;
    const typeUrls = Status.decode(raw).details.map((d) => d.typeUrl);
    expect(typeUrls).toContain('type.googleapis.com/google.rpc.RetryInfo');
    expect(results.some((r) => r.error === undefined)).toBe(true);
  });
});
