/**
 * Every ExamService method goes through the one gate. The methods are read from the generated
 * service definition and their request fields from the contract's descriptors, so an RPC added
 * to the proto is covered here without editing this file: it must echo the request id, refuse a
 * call without the token, refuse new calls once close has begun, and keep model, adapter and exam
 * paths inside the configured roots. Also the gate's one log line per call, and caller text only at
 * debug level outside production.
 */
import { Metadata, status } from '@grpc/grpc-js';
import { fromJson, toBinary, type DescField, type JsonValue } from '@bufbuild/protobuf';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadConfig, type GolemConfig } from '../src/config';
import { methodMessages } from '../src/contract';
import { startGateway, type Gateway } from '../src/gateway/server';
import { ExamServiceService, TakeExamResponse } from '../src/gen/golem/exam/v1/exam';
import { badExams, type BadExams } from './support/bad-exams';
import { fakeSidecarPython } from './support/fake-sidecar-command';
import { rawCall, type RawResult } from './support/grpc';
import { captureLogs, type CapturedLogs } from './support/logs';
import { tinyConfig, tinyModels, type TinyModels } from './support/tiny-models';
import { waitFor } from './support/wait';

process.env.HF_HUB_OFFLINE = '1';

const METHODS = Object.values(ExamServiceService).map((m) => ({ path: m.path, responseStream: m.responseStream }));
type Method = (typeof METHODS)[number];
const names = METHODS.map((m) => [m.path.slice(m.path.lastIndexOf('/') + 1), m] as const);

// The request fields that name a model, an adapter or an exam's file: each must stay inside its roots.
const PATH_FIELDS = ['model_name', 'adapter_path', 'adapters', 'exam_path', 'header_path', 'resume_path'];
const TOKEN_ENV = 'GOLEM_GATE_TEST_TOKEN';
const TOKEN = 'gate-test-token';

/** A request that would pass every check but the one under test, filled in by field name. */
function baseline(models: TinyModels, exams: BadExams): Record<string, JsonValue> {
  return {
    name: 'walked',
    prompt: 'Instruction: Which genre is dune?\nResponse:',
    prompts: ['Instruction: Which genre is dune?\nResponse:'],
    model_name: models.model,
    adapter_path: models.adapter,
    adapters: [models.adapter],
    max_new_tokens: 1,
    exam_path: exams.good,
    header_path: exams.goodHeader,
    resume_path: exams.newResults,
    include_base: true,
  };
}

/** The method's request as bytes: the baseline values of the fields it has, then `overrides`. */
function requestBytes(method: Method, values: Record<string, JsonValue>): Buffer {
  const input = requestFields(method);
  const json = Object.fromEntries(input.fields.filter((f) => f.name in values).map((f) => [f.name, values[f.name]]));
  return Buffer.from(toBinary(input.desc, fromJson(input.desc, json)));
}

function requestFields(method: Method): {
  desc: NonNullable<ReturnType<typeof methodMessages>>['input'];
  fields: DescField[];
} {
  const messages = methodMessages(method.path);
  if (!messages) throw new Error(`${method.path} is not in the contract's descriptors`);
  return { desc: messages.input, fields: messages.input.fields };
}

function call(address: string, method: Method, bytes: Buffer, metadata = new Metadata()): Promise<RawResult> {
  return rawCall(address, method.path, bytes, {
    metadata,
    responseStream: method.responseStream,
    deadline: Date.now() + 30000,
  });
}

function withRequestId(id: string): Metadata {
  const metadata = new Metadata();
  metadata.set('x-request-id', id);
  return metadata;
}

describe('the gate, walked over every ExamService method', () => {
  let models: TinyModels;
  let exams: BadExams;
  let examsDir: string;
  let root: string;
  let outside: string;
  let logs: CapturedLogs;
  let gateway: Gateway;
  let config: GolemConfig;

  beforeAll(async () => {
    models = tinyModels();
    // The tiny model and its adapters share one folder: the roots.
    root = path.dirname(models.model);
    outside = mkdtempSync(path.join(os.tmpdir(), 'golem-gate-outside-'));
    examsDir = mkdtempSync(path.join(os.tmpdir(), 'golem-gate-exams-'));
    exams = badExams(examsDir);
    logs = captureLogs('debug');
    const tiny = tinyConfig(models);
    config = {
      ...tiny,
      security: { ...tiny.security, modelRoots: [root], adapterRoots: [root], examRoots: [exams.root] },
    };
    gateway = await startGateway(config, { logger: logs.logger });
  });

  afterAll(async () => {
    await gateway?.close();
    rmSync(outside, { recursive: true, force: true });
    rmSync(examsDir, { recursive: true, force: true });
  });

  it('covers every method of the service', () => {
    expect(METHODS.length).toBeGreaterThanOrEqual(6);
    for (const method of METHODS) expect(methodMessages(method.path)).toBeDefined();
  });

  it.each(names)('%s: echoes the caller x-request-id, or one it made up', async (_name, method) => {
    const given = await call(
      gateway.address,
      method,
      requestBytes(method, baseline(models, exams)),
      withRequestId(`walk-${_name}`),
    );
    expect(given.headers?.get('x-request-id')).toEqual([`walk-${_name}`]);
    const made = await call(gateway.address, method, requestBytes(method, baseline(models, exams)));
    expect(made.headers?.get('x-request-id')[0]).toMatch(/^[0-9a-f-]{36}$/);
  });

  it.each(names)(
    '%s: logs one info line when the call ends, with method, code, ms and request id',
    async (name, method) => {
      const id = `log-${name}`;
      const { error } = await call(
        gateway.address,
        method,
        requestBytes(method, baseline(models, exams)),
        withRequestId(id),
      );
      const info = logs.lines().filter((line) => line.request_id === id && line.level === 'info');
      expect(info).toHaveLength(1);
      expect(info[0]).toMatchObject({ message: 'call', method: method.path, code: status[error?.code ?? status.OK] });
      expect(typeof info[0].ms).toBe('number');
    },
  );

  const pathCases = names.flatMap(([name, method]) =>
    requestFields(method)
      .fields.filter((f) => PATH_FIELDS.includes(f.name))
      .map((field) => [name, field.name, method, field] as const),
  );

  it('finds the path fields of the methods that have them', () => {
    expect(pathCases.map(([name, field]) => `${name}.${field}`)).toEqual(
      expect.arrayContaining([
        'TakeExam.model_name',
        'TakeExam.adapter_path',
        'LoadAdapter.adapter_path',
        'CompareAdapters.adapters',
        'GradeExam.exam_path',
        'GradeExam.header_path',
        'GradeExam.resume_path',
      ]),
    );
  });

  it.each(pathCases)(
    '%s: %s outside the roots is PERMISSION_DENIED PATH_OUTSIDE_ROOTS',
    async (_name, fieldName, method, field) => {
      const there = path.join(outside, 'elsewhere');
      const value = field.fieldKind === 'list' ? [there] : there;
      const { error, details } = await call(
        gateway.address,
        method,
        requestBytes(method, { ...baseline(models, exams), [fieldName]: value }),
      );
      expect({ code: error && status[error.code], reason: details?.reason }).toEqual({
        code: 'PERMISSION_DENIED',
        reason: 'PATH_OUTSIDE_ROOTS',
      });
      expect(details?.fieldViolations.map((v) => v.field.replace(/\[\d+\]$/, ''))).toEqual([fieldName]);
    },
  );

  describe('caller text in the logs', () => {
    const PROMPT = 'Instruction: Which genre is the hobbit?\nResponse:';

    // A second gateway on the same sidecar, logging at debug level.
    async function logsOfOneExam(production: boolean): Promise<{ logs: CapturedLogs; answer: string }> {
      const logs = captureLogs('debug');
      const sidecar = { ...config.sidecar, address: gateway.sidecarAddress };
      const second = await startGateway({ ...config, sidecar, production, logLevel: 'debug' }, { logger: logs.logger });
      try {
        const method = { path: ExamServiceService.takeExam.path, responseStream: false };
        const result = await call(second.address, method, requestBytes(method, { prompt: PROMPT, max_new_tokens: 3 }));
        expect(result.error).toBeUndefined();
        await waitFor(() => logs.lines().some((line) => line.message === 'call'));
        return { logs, answer: TakeExamResponse.decode(result.messages[0]).answer };
      } finally {
        await second.close();
      }
    }

    it('logs the prompt and the unary TakeExam answer at debug level outside production', async () => {
      const { logs, answer } = await logsOfOneExam(false);
      const debug = logs.lines().filter((line) => line.level === 'debug');
      expect(debug.find((line) => line.message === 'request')).toMatchObject({ request: { prompt: PROMPT } });
      expect(debug.find((line) => line.message === 'response')).toMatchObject({ response: { answer } });
      // Never at info level.
      const info = logs.lines().filter((line) => line.level === 'info');
      expect(JSON.stringify(info)).not.toContain('hobbit');
    });

    it('never logs caller text with production: true, even at debug level', async () => {
      const { logs } = await logsOfOneExam(true);
      expect(logs.text()).not.toContain('hobbit');
      expect(logs.lines().some((line) => line.message === 'call')).toBe(true);
    });
  });

  describe('with a bearer token configured', () => {
    let guarded: Gateway;

    beforeAll(async () => {
      guarded = await startGateway(
        {
          ...config,
          security: { ...config.security, authTokenEnv: TOKEN_ENV },
          sidecar: { ...config.sidecar, address: gateway.sidecarAddress },
        },
        { env: { [TOKEN_ENV]: TOKEN }, logger: captureLogs('error').logger },
      );
    });

    afterAll(async () => guarded?.close());

    it.each(names)('%s: a call without the token is UNAUTHENTICATED; with it, it is not', async (_name, method) => {
      const bytes = requestBytes(method, baseline(models, exams));
      const refused = await call(guarded.address, method, bytes);
      expect(refused.error && status[refused.error.code]).toBe('UNAUTHENTICATED');
      expect(refused.details?.reason).toBe('UNAUTHENTICATED');
      const metadata = new Metadata();
      metadata.set('authorization', `Bearer ${TOKEN}`);
      const allowed = await call(guarded.address, method, bytes, metadata);
      expect(allowed.error?.code).not.toBe(status.UNAUTHENTICATED);
    });
  });
});

describe('the gate once close has begun', () => {
  let dir: string;
  let gateway: Gateway;
  let closed: Promise<void>;

  beforeAll(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-gate-close-'));
    const config = loadConfig({ env: {} });
    gateway = await startGateway(
      {
        ...config,
        listen: '127.0.0.1:0',
        // A sidecar that never answers: the call in flight holds the drain open for the grace period.
        sidecar: { ...config.sidecar, python: fakeSidecarPython(dir, 'hang'), startTimeoutMs: 20000 },
        limits: { ...config.limits, shutdownGraceMs: 4000 },
      },
      { logger: captureLogs('error').logger },
    );
    const takeExam = ExamServiceService.takeExam;
    const inFlight = call(gateway.address, { path: takeExam.path, responseStream: false }, Buffer.alloc(0));
    void inFlight;
    await new Promise((resolve) => setTimeout(resolve, 200));
    closed = gateway.close();
  });

  afterAll(async () => {
    await closed;
    rmSync(dir, { recursive: true, force: true });
  });

  it.each(names)('%s: a new call is UNAVAILABLE SHUTTING_DOWN', async (_name, method) => {
    const { error, details } = await call(gateway.address, method, Buffer.alloc(0));
    expect({ code: error && status[error.code], reason: details?.reason }).toEqual({
      code: 'UNAVAILABLE',
      reason: 'SHUTTING_DOWN',
    });
  });
});
