/**
 * The bad-input matrix: every case goes through the `golem exam` command and straight over gRPC
 * to one shared `golem serve` on the tiny models, and must come back with its exact status code,
 * ErrorInfo reason and BadRequest field (and, from the CLI, its exit code and failure JSON); the
 * next good request must still succeed. To add a case, add a row to CASES.
 */
import { status, type CallOptions } from '@grpc/grpc-js';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseExamInput } from '../src/cli/input';
import type { ExamServiceClient, TakeExamRequest } from '../src/gen/golem/exam/v1/exam';
import { badAdapters, type BadAdapters } from './support/bad-adapters';
import { buildCli, golem, serve, stopDaemon, type Daemon } from './support/daemon';
import { examClient, rawCall, takeExam, type CallResult } from './support/grpc';
import { tinyConfig, tinyModels, type TinyModels } from './support/tiny-models';

type Code = keyof typeof status;

interface Expected {
  code: Code;
  /** The ErrorInfo reason; left out where grpc-js itself answers (no details to check). */
  reason?: string;
  /** The one BadRequest field violation, when the error names a field. */
  field?: string;
}

interface Fixtures {
  models: TinyModels;
  bad: BadAdapters;
}

/** A call to the gateway: a typed request, or raw bytes to any method. */
type GrpcAttempt =
  | { request: Partial<TakeExamRequest>; options?: Partial<CallOptions> }
  | { method: string; bytes: Buffer };

interface BadInputCase {
  name: string;
  /** The `golem exam` argument; left out when the CLI cannot express the case. */
  cli?: (fx: Fixtures) => string;
  /** The same case sent straight to the gateway; left out when gRPC cannot express it. */
  grpc?: (fx: Fixtures) => GrpcAttempt;
  /** What both answer; `cliExpect` when the CLI refuses the input itself, differently. */
  expect: Expected;
  cliExpect?: Expected;
}

// The exit code each status must give, written out rather than taken from src/cli/exit-codes.
const EXIT: Partial<Record<Code, number>> = {
  INVALID_ARGUMENT: 2,
  NOT_FOUND: 3,
  FAILED_PRECONDITION: 4,
  UNAVAILABLE: 5,
  DEADLINE_EXCEEDED: 6,
  RESOURCE_EXHAUSTED: 7,
  PERMISSION_DENIED: 8,
  UNAUTHENTICATED: 9,
};
const EXAM_METHOD = '/golem.exam.v1.ExamService/TakeExam';
const MiB = 1 << 20;

/** A case the CLI and a gRPC caller can both send: the exam JSON, mapped as the CLI maps it. */
function exam(name: string, input: (fx: Fixtures) => Record<string, unknown>, expect: Expected): BadInputCase {
  return {
    name,
    cli: (fx) => JSON.stringify(input(fx)),
    grpc: (fx) => {
      const parsed = parseExamInput(JSON.stringify(input(fx)));
      if (!parsed.ok) throw new Error(`case "${name}" is not valid exam JSON: ${JSON.stringify(parsed.violations)}`);
      return { request: parsed.request };
    },
    expect,
  };
}

/** A case only the CLI can send: it refuses the input before calling anyone. */
function cliOnly(name: string, argument: string, field: string, reason = 'INVALID_INPUT'): BadInputCase {
  return { name, cli: () => argument, expect: { code: 'INVALID_ARGUMENT', reason, field } };
}

const invalidField = (field: string): Expected => ({ code: 'INVALID_ARGUMENT', reason: 'INVALID_FIELD', field });
const adapterCase = (name: string, pick: (bad: BadAdapters) => string, code: Code, reason: string): BadInputCase =>
  exam(name, (fx) => ({ adapterPath: pick(fx.bad) }), { code, reason, field: 'adapter_path' });

const CASES: BadInputCase[] = [
  // The command line's own checks.
  cliOnly('not JSON', '{"prompt": ', 'input'),
  cliOnly('JSON, not an object: an array', '[1, 2]', 'input'),
  cliOnly('JSON, not an object: a string', '"Which genre is dune?"', 'input'),
  cliOnly('JSON, not an object: null', 'null', 'input'),
  cliOnly('unknown key', '{"max_new_tokens": 5}', 'max_new_tokens'),
  cliOnly('unknown nested key', '{"quantization": {"loadIn4bit": true}}', 'quantization.loadIn4bit'),
  cliOnly('wrong type: maxNewTokens a string', '{"maxNewTokens": "5"}', 'maxNewTokens'),
  cliOnly('wrong type: prompt a number', '{"prompt": 5}', 'prompt'),
  cliOnly('wrong type: quantization a boolean', '{"quantization": true}', 'quantization'),
  cliOnly('wrong type: disableAdapter a string', '{"disableAdapter": "yes"}', 'disableAdapter'),
  cliOnly('maxNewTokens 1.5', '{"maxNewTokens": 1.5}', 'maxNewTokens'),
  cliOnly('maxNewTokens beyond int32', '{"maxNewTokens": 2147483648}', 'maxNewTokens'),
  {
    name: 'huge argument',
    cli: () => JSON.stringify({ prompt: 'x'.repeat(70000) }),
    cliExpect: { code: 'INVALID_ARGUMENT', reason: 'INPUT_TOO_LARGE', field: 'input' },
    // Over gRPC: a message over limits.maxMessageBytes, refused by grpc-js itself.
    grpc: () => ({ request: { prompt: 'x'.repeat(MiB + 1000) } }),
    expect: { code: 'RESOURCE_EXHAUSTED' },
  },

  // The gateway's validation.
  exam('empty prompt', () => ({ prompt: '' }), invalidField('prompt')),
  exam('empty modelName', () => ({ modelName: '' }), invalidField('model_name')),
  exam('empty adapterPath', () => ({ adapterPath: '' }), invalidField('adapter_path')),
  exam('empty device', () => ({ device: '' }), invalidField('device')),
  exam('whitespace-only prompt', () => ({ prompt: ' \n\t ' }), invalidField('prompt')),
  exam('maxNewTokens 0', () => ({ maxNewTokens: 0 }), invalidField('max_new_tokens')),
  exam('maxNewTokens negative', () => ({ maxNewTokens: -3 }), invalidField('max_new_tokens')),
  exam('maxNewTokens above the cap', () => ({ maxNewTokens: 513 }), invalidField('max_new_tokens')),
  exam('device "tpu"', () => ({ device: 'tpu' }), invalidField('device')),
  exam('unknown compute dtype', () => ({ quantization: { bnb4BitComputeDtype: 'int3' } }), invalidField('quantization.bnb_4bit_compute_dtype')),

  // The sidecar's checks.
  // The tiny model's context is 2048 tokens; this is about 2200, and still under maxInputBytes.
  exam('prompt longer than the model context', () => ({ prompt: 'genre '.repeat(2200) }), {
    code: 'INVALID_ARGUMENT',
    reason: 'PROMPT_TOO_LONG',
    field: 'prompt',
  }),
  exam('device "cuda:7"', () => ({ device: 'cuda:7' }), { code: 'FAILED_PRECONDITION', reason: 'DEVICE_UNAVAILABLE', field: 'device' }),
  exam('4-bit without CUDA and bitsandbytes', () => ({ quantization: { loadIn4Bit: true } }), {
    code: 'FAILED_PRECONDITION',
    reason: 'QUANTIZATION_UNAVAILABLE',
    field: 'quantization.load_in_4bit',
  }),
  exam('model neither a local path nor cached', () => ({ modelName: 'no-such-org/no-such-model' }), {
    code: 'NOT_FOUND',
    reason: 'MODEL_NOT_FOUND',
    field: 'model_name',
  }),
  adapterCase('adapter path missing', (bad) => bad.missing, 'NOT_FOUND', 'ADAPTER_NOT_FOUND'),
  adapterCase('adapter path a file', (bad) => bad.file, 'INVALID_ARGUMENT', 'ADAPTER_NOT_A_DIRECTORY'),
  adapterCase('adapter without adapter_config.json', (bad) => bad.noConfig, 'FAILED_PRECONDITION', 'ADAPTER_CONFIG_MISSING'),
  adapterCase('adapter config not JSON', (bad) => bad.configNotJson, 'FAILED_PRECONDITION', 'ADAPTER_CONFIG_INVALID'),
  adapterCase('adapter config not a PEFT config', (bad) => bad.configNotPeft, 'FAILED_PRECONDITION', 'ADAPTER_CONFIG_INVALID'),
  adapterCase('adapter without safetensors', (bad) => bad.noWeights, 'FAILED_PRECONDITION', 'ADAPTER_WEIGHTS_MISSING'),
  adapterCase('adapter with only adapter_model.bin', (bad) => bad.pickleOnly, 'FAILED_PRECONDITION', 'ADAPTER_PICKLE_REFUSED'),
  adapterCase('adapter safetensors truncated', (bad) => bad.truncatedWeights, 'FAILED_PRECONDITION', 'ADAPTER_WEIGHTS_CORRUPT'),
  adapterCase('adapter safetensors corrupt', (bad) => bad.corruptWeights, 'FAILED_PRECONDITION', 'ADAPTER_WEIGHTS_CORRUPT'),
  adapterCase('adapter for a base of another hidden size', (bad) => bad.otherSize, 'FAILED_PRECONDITION', 'ADAPTER_INCOMPATIBLE'),
  adapterCase('adapter targeting modules the base lacks', (bad) => bad.missingTargets, 'FAILED_PRECONDITION', 'ADAPTER_INCOMPATIBLE'),
  adapterCase('adapter outside security.adapterRoots', (bad) => bad.outsideRoots, 'PERMISSION_DENIED', 'PATH_OUTSIDE_ROOTS'),
  adapterCase('adapter symlink out of the roots', (bad) => bad.symlinkOut, 'PERMISSION_DENIED', 'PATH_OUTSIDE_ROOTS'),
  adapterCase('adapter path climbing out with ..', (bad) => bad.dotDotOut, 'PERMISSION_DENIED', 'PATH_OUTSIDE_ROOTS'),

  // The protocol, over gRPC only.
  {
    name: 'unknown method',
    grpc: () => ({ method: '/golem.exam.v1.ExamService/Nope', bytes: Buffer.alloc(0) }),
    expect: { code: 'UNIMPLEMENTED' },
  },
  {
    name: 'unknown service',
    grpc: () => ({ method: '/golem.exam.v9.NoService/TakeExam', bytes: Buffer.alloc(0) }),
    expect: { code: 'UNIMPLEMENTED' },
  },
  {
    // Field 1 (model_name) says 2^35 bytes follow; three do.
    name: 'bytes that do not parse as TakeExamRequest',
    grpc: () => ({ method: EXAM_METHOD, bytes: Buffer.from([0x0a, 0x80, 0x80, 0x80, 0x80, 0x01, 0x61, 0x62, 0x63]) }),
    expect: { code: 'INTERNAL' },
  },
  {
    name: 'raw message over limits.maxMessageBytes',
    grpc: () => ({ method: EXAM_METHOD, bytes: Buffer.alloc(MiB + 1) }),
    expect: { code: 'RESOURCE_EXHAUSTED' },
  },
  {
    name: 'deadline shorter than loading the model takes',
    grpc: (fx) => ({
      request: { modelName: fx.bad.unloadedModel, disableAdapter: true },
      options: { deadline: Date.now() + 30 },
    }),
    expect: { code: 'DEADLINE_EXCEEDED' },
  },
];

describe('bad-input matrix', () => {
  const fx = {} as Fixtures;
  let dir: string;
  let outside: string;
  let daemon: Daemon;
  let address: string;
  let client: ExamServiceClient;

  beforeAll(async () => {
    buildCli();
    fx.models = tinyModels();
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-matrix-'));
    outside = mkdtempSync(path.join(os.tmpdir(), 'golem-outside-'));
    fx.bad = badAdapters(fx.models, dir, outside);
    const config = tinyConfig(fx.models);
    const configFile = path.join(dir, 'golem.json');
    const adapterRoots = [path.dirname(fx.models.adapter), dir];
    writeFileSync(
      configFile,
      JSON.stringify({ ...config, logLevel: 'info', security: { ...config.security, adapterRoots } }),
    );
    daemon = serve(configFile);
    address = await daemon.ready;
    client = examClient(address);
  });

  afterAll(async () => {
    client?.close();
    expect(await stopDaemon(daemon)).toBe(0);
    rmSync(dir, { recursive: true, force: true });
    rmSync(outside, { recursive: true, force: true });
  });

  async function expectGoodRequestServed(): Promise<void> {
    const { error, response } = await takeExam(client, { maxNewTokens: 1 });
    expect(error).toBeUndefined();
    expect(response?.answerTokens).toBe(1);
  }

  const cliCases = CASES.filter((c) => c.cli);
  const grpcCases = CASES.filter((c) => c.grpc);

  it.each(cliCases.map((c) => [c.name, c] as const))('CLI: %s', async (_name, c) => {
    const expected = c.cliExpect ?? c.expect;
    const run = await golem(['exam', (c.cli as (fx: Fixtures) => string)(fx), '--address', address]);
    const exit = EXIT[expected.code] ?? 1;
    expect({ code: run.code, status: run.json.status, exitCode: run.json.exitCode }).toEqual({
      code: exit,
      status: 'failure',
      exitCode: exit,
    });
    const detail = run.json.detail as { code: string; reason: string; fieldViolations: Array<{ field: string }> };
    expect(detail.code).toBe(expected.code);
    if (expected.reason !== undefined) expect(detail.reason).toBe(expected.reason);
    if (expected.field !== undefined) expect(detail.fieldViolations.map((v) => v.field)).toEqual([expected.field]);
    expect(run.stderr).toContain('golem: error: ');
    await expectGoodRequestServed();
  });

  it.each(grpcCases.map((c) => [c.name, c] as const))('gRPC: %s', async (_name, c) => {
    const attempt = (c.grpc as (fx: Fixtures) => GrpcAttempt)(fx);
    const result: CallResult =
      'method' in attempt
        ? await rawCall(address, attempt.method, attempt.bytes)
        : await takeExam(client, attempt.request, undefined, attempt.options);
    expect(result.error && status[result.error.code]).toBe(c.expect.code);
    if (c.expect.reason !== undefined) expect(result.details?.reason).toBe(c.expect.reason);
    if (c.expect.field !== undefined) expect(result.details?.fieldViolations.map((v) => v.field)).toEqual([c.expect.field]);
    await expectGoodRequestServed();
  });

  it('still answers a good exam through the CLI after all of it', async () => {
    const run = await golem(['exam', '{"maxNewTokens": 2}', '--address', address]);
    expect(run).toMatchObject({ code: 0, json: { status: 'success', exitCode: 0 } });
  });
});
