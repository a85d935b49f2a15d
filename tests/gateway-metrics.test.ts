/**
 * The metrics endpoint of a real gateway in front of a real sidecar on the tiny model: scraped
 * while exams run, parsed by prometheus_client's parser (inference_py/tests/prometheus_text.py),
 * and timed.
 */
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Metadata, status } from '@grpc/grpc-js';
import { PACKAGE_ROOT } from '../src/config';
import { startGateway, type Gateway } from '../src/gateway/server';
import type { ExamServiceClient, TakeExamRequest } from '../src/gen/golem/exam/v1/exam';
import { ScrapeRequest, SidecarMetricsServiceService } from '../src/gen/golem/sidecar/v1/metrics';
import { examClient, rawCall, takeExam } from './support/grpc';
import { PYTHON, tinyConfig, tinyModels, type TinyModels } from './support/tiny-models';

process.env.HF_HUB_OFFLINE = '1';
const TOKEN_ENV = 'GOLEM_METRICS_TEST_TOKEN';
const TOKEN = 'metrics-test-token';
const PARSER = path.join(PACKAGE_ROOT, 'inference_py', 'tests', 'prometheus_text.py');
const TAKE = 'golem.exam.v1.ExamService/TakeExam';

// Every family each process exposes (counters by their name without _total, as parsed).
const GATEWAY_NAMES = ['golem_gateway_requests', 'golem_gateway_request_duration_seconds', 'golem_gateway_sidecar_up'];
const SIDECAR_NAMES = [
  'vllm:num_requests_waiting',
  'vllm:num_requests_running',
  'vllm:gpu_cache_usage_perc',
  'vllm:kv_cache_usage_perc',
  'vllm:lora_requests_info',
  'golem_sidecar_requests',
  'golem_sidecar_request_duration_seconds',
  'golem_time_to_first_token_seconds',
  'golem_queue_depth',
  'golem_batch_rows',
  'golem_generated_tokens',
  'golem_resident_model_bytes',
  'golem_resident_adapter_bytes',
  'golem_adapter_requests',
];

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}
type Families = Record<string, { type: string; samples: Sample[] }>;

/** Parses expositions with prometheus_client's parser, in one Python run. */
function parse(texts: string[]): Families[] {
  const printed = execFileSync(PYTHON, [PARSER], { input: JSON.stringify(texts), maxBuffer: 64 << 20 });
  return JSON.parse(printed.toString()) as Families[];
}

/** The value of the one sample named `name` whose labels include `labels`. */
function value(families: Families, name: string, labels: Record<string, string> = {}): number {
  const found = Object.values(families)
    .flatMap((family) => family.samples)
    .filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  expect(found).toHaveLength(1);
  return found[0].value;
}

/** The middle of sorted numbers. */
function median(sorted: number[]): number {
  return sorted[Math.floor(sorted.length / 2)];
}

function authorized(): Metadata {
  const metadata = new Metadata();
  metadata.set('authorization', `Bearer ${TOKEN}`);
  return metadata;
}

describe('the metrics endpoint', () => {
  let models: TinyModels;
  let gateway: Gateway;
  let client: ExamServiceClient;
  let url: string;

  beforeAll(async () => {
    models = tinyModels();
    const config = tinyConfig(models);
    gateway = await startGateway(
      {
        ...config,
        metrics: { listen: '127.0.0.1:0' },
        // Two rows a batch, so that a few calls make a queue.
        limits: { ...config.limits, maxBatchSize: 2 },
        security: { ...config.security, authTokenEnv: TOKEN_ENV },
      },
      { env: { [TOKEN_ENV]: TOKEN } },
    );
    client = examClient(gateway.address);
    url = `http://${gateway.metricsAddress}/metrics`;
  });

  afterAll(async () => {
    client?.close();
    await gateway?.close();
  });

  const scrape = async (): Promise<string> => {
    const response = await fetch(url);
    expect(response.status).toBe(200);
    expect(response.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
    return response.text();
  };

  it("shows every name of both processes during load, merged, with the sidecar's values moving", async () => {
    const refused = await takeExam(client, { maxNewTokens: 1 });
    expect(refused.error?.code).toBe(status.UNAUTHENTICATED);
    const before = await scrape();
    const exam = (request: Partial<TakeExamRequest>) => takeExam(client, request, authorized());
    const calls = [0, 1, 2, 3].map((i) => exam({ prompt: `Book ${i}`, maxNewTokens: 48 }));
    calls.push(exam({ prompt: 'Genre', maxNewTokens: 48, adapterPath: models.adapter_b }));
    let done = false;
    const load = Promise.all(calls).finally(() => (done = true));
    const during: string[] = [];
    const ms: number[] = [];
    while (!done) {
      const started = performance.now();
      during.push(await scrape());
      ms.push(performance.now() - started);
    }
    const answers = await load;
    const after = await scrape();
    ms.sort((a, b) => a - b);
    process.stdout.write(`metrics scrape under load: ${ms.length} scrapes, median ${median(ms).toFixed(2)} ms\n`);

    for (const text of [before, ...during, after]) {
      // One HELP and one TYPE line per family, whichever process it came from.
      const heads = text.split('\n').filter((line) => line.startsWith('# '));
      expect(new Set(heads).size).toBe(heads.length);
    }
    const [first, ...rest] = parse([before, ...during, after]);
    const last = rest.pop() as Families;
    for (const families of [first, ...rest, last]) {
      expect(Object.keys(families).sort()).toEqual([...GATEWAY_NAMES, ...SIDECAR_NAMES].sort());
      expect(value(families, 'golem_gateway_sidecar_up')).toBe(1);
    }
    expect(Math.max(...rest.map((f) => value(f, 'vllm:num_requests_waiting')))).toBeGreaterThan(0);
    expect(Math.max(...rest.map((f) => value(f, 'vllm:num_requests_running')))).toBeGreaterThan(0);
    expect(Math.max(...rest.map((f) => value(f, 'vllm:kv_cache_usage_perc')))).toBeGreaterThan(0);

    const tokens = (f: Families): number => value(f, 'golem_generated_tokens_total');
    const answered = answers.reduce((sum, a) => sum + (a.response?.answerTokens ?? 0), 0);
    expect(answers.every((a) => a.error === undefined)).toBe(true);
    expect(tokens(last) - tokens(first)).toBe(answered);
    const gatewayCalls = (f: Families, code: string): number =>
      value(f, 'golem_gateway_requests_total', { method: TAKE, code });
    expect(gatewayCalls(last, 'OK')).toBe(5);
    expect(gatewayCalls(last, 'UNAUTHENTICATED')).toBe(1);
    // The refusal never reached the sidecar.
    expect(value(last, 'golem_sidecar_requests_total', { method: TAKE, code: 'OK' })).toBe(5);
    expect(value(last, 'golem_time_to_first_token_seconds_count', { method: TAKE })).toBe(5);
    const [lora] = last['vllm:lora_requests_info'].samples;
    expect(lora.labels.running_lora_adapters.split(',')).toContain(models.adapter_b);
    expect(lora.labels.max_lora).toBe('8');
    expect(value(last, 'vllm:num_requests_running')).toBe(0);
  });

  it('takes well under 50 ms a scrape', async () => {
    const ms: number[] = [];
    for (let i = 0; i < 100; i += 1) {
      const started = performance.now();
      await scrape();
      ms.push(performance.now() - started);
    }
    ms.sort((a, b) => a - b);
    process.stdout.write(`metrics scrape, idle: median ${median(ms).toFixed(2)} ms, slowest ${ms[99].toFixed(2)} ms\n`);
    expect(median(ms)).toBeLessThan(50);
  });

  it('keeps the sidecar metrics service from callers', async () => {
    const path = SidecarMetricsServiceService.scrape.path;
    const result = await rawCall(gateway.address, path, ScrapeRequest.encode({}).finish(), {
      metadata: authorized(),
    });
    expect(result.error?.code).toBe(status.UNIMPLEMENTED);
  });

  it('answers 404 beside /metrics', async () => {
    const response = await fetch(url.replace('/metrics', '/'));
    expect(response.status).toBe(404);
  });
});

describe('the metrics endpoint without its sidecar', () => {
  it("answers with the gateway's metrics alone, and says the sidecar is not there", async () => {
    const config = tinyConfig(tinyModels());
    const gateway = await startGateway({
      ...config,
      sidecar: { ...config.sidecar, address: 'unix:/nonexistent/golem-metrics-test.sock' },
      metrics: { listen: '127.0.0.1:0' },
    });
    try {
      const response = await fetch(`http://${gateway.metricsAddress}/metrics`);
      expect(response.status).toBe(200);
      const [families] = parse([await response.text()]);
      expect(Object.keys(families).sort()).toEqual([...GATEWAY_NAMES].sort());
      expect(value(families, 'golem_gateway_sidecar_up')).toBe(0);
    } finally {
      await gateway.close();
    }
  });
});
