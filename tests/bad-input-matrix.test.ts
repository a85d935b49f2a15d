/**
 * The bad-input matrix: every case goes through the `golem` command and straight over gRPC to one
 * shared `golem serve` on the tiny models, and must come back with its exact status code,
 * ErrorInfo reason and BadRequest field (and, from the CLI, its exit code and failure JSON); the
 * next good request must still succeed. Every ExamService method has rows (a test fails when one
 * has none). To add a case, add a row to CASES.
 */
import { status, type CallOptions, type ServiceError } from '@grpc/grpc-js';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseRequest } from '../src/cli/input';
import { methodMessages } from '../src/contract';
import type { ErrorDetails } from '../src/gateway/errors';
import {
  ExamServiceService,
  type ExamServiceClient,
  type GradeExamRequest,
  type GradeExamResponse,
} from '../src/gen/golem/exam/v1/exam';
import { badAdapters, type BadAdapters } from './support/bad-adapters';
import { badExams, type BadExams } from './support/bad-exams';
import { buildCli, golem, serve, stopDaemon, type Daemon } from './support/daemon';
import { examClient, gradeExam, rawCall, takeExam } from './support/grpc';
import { tinyConfig, tinyModels, type TinyModels } from './support/tiny-models';

type Code = keyof typeof status;
type MethodName = keyof typeof ExamServiceService;

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
  /** Exam files; security.examRoots holds `exams.root`. */
  exams: BadExams;
  /** A folder outside every root. */
  outside: string;
}

/**
 * A call to the gateway: a request as its proto3 JSON, raw bytes to any path, or a GradeExam
 * request through the generated client's stream.
 */
type GrpcAttempt =
  | { json: Record<string, unknown>; options?: Partial<CallOptions> }
  | { bytes: Buffer; path?: string }
  | { grade: Partial<GradeExamRequest> };

interface BadInputCase {
  name: string;
  /** The ExamService method the case calls; left out for a method that does not exist. */
  method?: MethodName;
  /** The `golem` arguments (without --address); left out when the CLI cannot express the case. */
  cli?: (fx: Fixtures) => string[];
  /** The same case sent straight to the gateway; left out when gRPC cannot express it. */
  grpc?: (fx: Fixtures) => GrpcAttempt;
  /** What both answer; `cliExpect` when the CLI refuses the input itself, differently. */
  expect: Expected;
  cliExpect?: Expected;
  /** Text the gRPC status message must contain. */
  says?: (fx: Fixtures) => string[];
  /**
   * What a stream sent before the refusal (a GradeExam message by its oneof): nothing, unless
   * the case says otherwise.
   */
  streamed?: string[];
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
const MiB = 1 << 20;
const PROMPT = 'Instruction: Which genre is dune?\nResponse:';

type Input = (fx: Fixtures) => Record<string, unknown>;

/** A case the CLI and a gRPC caller can both send, as the same proto3 JSON. */
function jsonCase(method: MethodName, cli: (json: string) => string[]) {
  return (name: string, input: Input, expect: Expected): BadInputCase => ({
    name: `${method}: ${name}`,
    method,
    cli: (fx) => cli(JSON.stringify(input(fx))),
    grpc: (fx) => ({ json: input(fx) }),
    expect,
  });
}

const exam = jsonCase('takeExam', (json) => ['exam', json]);
const stream = jsonCase('streamExam', (json) => ['exam', json, '--stream']);
const compare = jsonCase('compareAdapters', (json) => ['compare', json]);

/** `golem adapters load NAME PATH [--model M]`, and LoadAdapter with the same fields. */
function load(
  name: string,
  input: (fx: Fixtures) => { name: string; adapterPath: string; modelName?: string },
  expect: Expected,
): BadInputCase {
  return {
    name: `loadAdapter: ${name}`,
    method: 'loadAdapter',
    cli: (fx) => {
      const { name: adapter, adapterPath, modelName } = input(fx);
      return ['adapters', 'load', adapter, adapterPath, ...(modelName === undefined ? [] : ['--model', modelName])];
    },
    grpc: (fx) => ({ json: input(fx) }),
    expect,
  };
}

/** `golem adapters unload NAME`, and UnloadAdapter. */
function unload(name: string, adapter: string, expect: Expected): BadInputCase {
  return {
    name: `unloadAdapter: ${name}`,
    method: 'unloadAdapter',
    cli: () => ['adapters', 'unload', adapter],
    grpc: () => ({ json: { name: adapter } }),
    expect,
  };
}

/** A case only the CLI can send: it refuses the input before calling anyone. */
function cliOnly(name: string, argument: string, field: string, reason = 'INVALID_INPUT'): BadInputCase {
  return {
    name,
    method: 'takeExam',
    cli: () => ['exam', argument],
    expect: { code: 'INVALID_ARGUMENT', reason, field },
  };
}

/** Raw bytes to a method, as a client that does not speak the contract would send. */
function raw(name: string, method: MethodName, bytes: Buffer, expect: Expected): BadInputCase {
  return { name: `${method}: ${name}`, method, grpc: () => ({ bytes }), expect };
}

/**
 * A GradeExam case, sent through the generated client and as `golem grade`. Cases with a resume
 * file go over gRPC only: the command would cut the fixture's unfinished last line off first.
 */
function grade(
  name: string,
  request: (fx: Fixtures) => Partial<GradeExamRequest>,
  expect: Expected,
  more: Pick<BadInputCase, 'says' | 'streamed'> = {},
): BadInputCase {
  const gradeArgs = (fx: Fixtures): string[] => {
    const r = request(fx);
    return [
      'grade',
      r.examPath ?? '',
      ...(r.includeBase ? ['--base'] : []),
      ...(r.adapters ?? []).flatMap((adapter) => ['--adapter', adapter]),
      ...(r.scorers ?? []).flatMap((scorer) => ['--scorer', scorer]),
      ...(r.headerPath === undefined ? [] : ['--header', r.headerPath]),
      ...(r.modelName === undefined ? [] : ['--model', r.modelName]),
    ];
  };
  // A case naming a results file goes over gRPC only (see above).
  const resumes = name.includes('results');
  return {
    name: `gradeExam: ${name}`,
    method: 'gradeExam',
    grpc: (fx) => ({ grade: request(fx) }),
    ...(resumes ? {} : { cli: gradeArgs }),
    expect,
    ...more,
  };
}

/** An exam file refused whole: the file with `:line` (when there is one) and `more` in the message. */
function badExam(name: string, pick: (exams: BadExams) => string, line: number | undefined, ...more: string[]) {
  return grade(
    name,
    (fx) => ({ examPath: pick(fx.exams), includeBase: true }),
    { code: 'INVALID_ARGUMENT', reason: 'INVALID_EXAM', field: 'exam_path' },
    { says: (fx) => [`${pick(fx.exams)}${line === undefined ? ':' : `:${line}:`}`, ...more] },
  );
}

const invalidField = (field: string): Expected => ({ code: 'INVALID_ARGUMENT', reason: 'INVALID_FIELD', field });
const outsideRoots = (field: string): Expected => ({ code: 'PERMISSION_DENIED', reason: 'PATH_OUTSIDE_ROOTS', field });
const adapterCase = (name: string, pick: (bad: BadAdapters) => string, code: Code, reason: string): BadInputCase =>
  exam(name, (fx) => ({ adapterPath: pick(fx.bad) }), { code, reason, field: 'adapter_path' });
// Field 1 says 2^35 bytes follow; three do.
const UNDECODABLE = Buffer.from([0x0a, 0x80, 0x80, 0x80, 0x80, 0x01, 0x61, 0x62, 0x63]);

const CASES: BadInputCase[] = [
  // The command line's own checks.
  cliOnly('not JSON', '{"prompt": ', 'input'),
  cliOnly('JSON, not an object: an array', '[1, 2]', 'input'),
  cliOnly('JSON, not an object: a string', '"Which genre is dune?"', 'input'),
  cliOnly('JSON, not an object: null', 'null', 'input'),
  cliOnly('unknown key', '{"maxTokens": 5}', 'maxTokens'),
  cliOnly('unknown nested key', '{"quantization": {"loadIn4bit": true}}', 'quantization.loadIn4bit'),
  cliOnly('wrong type: maxNewTokens a word', '{"maxNewTokens": "five"}', 'maxNewTokens'),
  cliOnly('wrong type: prompt a number', '{"prompt": 5}', 'prompt'),
  cliOnly('wrong type: quantization a boolean', '{"quantization": true}', 'quantization'),
  cliOnly(
    'wrong type: bnb4BitUseDoubleQuant a string',
    '{"quantization": {"bnb4BitUseDoubleQuant": "yes"}}',
    'quantization.bnb4BitUseDoubleQuant',
  ),
  cliOnly('wrong type: disableAdapter a string', '{"disableAdapter": "yes"}', 'disableAdapter'),
  cliOnly('maxNewTokens 1.5', '{"maxNewTokens": 1.5}', 'maxNewTokens'),
  cliOnly('maxNewTokens beyond int32', '{"maxNewTokens": 2147483648}', 'maxNewTokens'),
  cliOnly('seed beyond uint64', '{"seed": 18446744073709551616}', 'seed'),
  {
    name: 'huge argument',
    method: 'takeExam',
    cli: () => ['exam', JSON.stringify({ prompt: 'x'.repeat(70000) })],
    cliExpect: { code: 'INVALID_ARGUMENT', reason: 'INPUT_TOO_LARGE', field: 'input' },
    // Over gRPC: a message over limits.maxMessageBytes, refused by grpc-js itself.
    grpc: () => ({ json: { prompt: 'x'.repeat(MiB + 1000) } }),
    expect: { code: 'RESOURCE_EXHAUSTED' },
  },

  // TakeExam: the sidecar's field checks.
  exam('empty prompt', () => ({ prompt: '' }), invalidField('prompt')),
  exam('empty modelName', () => ({ modelName: '' }), invalidField('model_name')),
  exam('empty adapterPath', () => ({ adapterPath: '' }), invalidField('adapter_path')),
  exam('empty device', () => ({ device: '' }), invalidField('device')),
  exam('whitespace-only prompt', () => ({ prompt: ' \n\t ' }), invalidField('prompt')),
  exam('maxNewTokens 0', () => ({ maxNewTokens: 0 }), invalidField('max_new_tokens')),
  exam('maxNewTokens negative', () => ({ maxNewTokens: -3 }), invalidField('max_new_tokens')),
  exam('maxNewTokens above the cap', () => ({ maxNewTokens: 513 }), invalidField('max_new_tokens')),
  exam('device "tpu"', () => ({ device: 'tpu' }), invalidField('device')),
  exam(
    'unknown compute dtype',
    () => ({ quantization: { bnb4BitComputeDtype: 'int3' } }),
    invalidField('quantization.bnb_4bit_compute_dtype'),
  ),
  exam(
    'unknown 4-bit quant type',
    () => ({ quantization: { loadIn4Bit: true, bnb4BitQuantType: 'nf8' } }),
    invalidField('quantization.bnb_4bit_quant_type'),
  ),

  // TakeExam: what the sidecar finds when it looks.
  // The tiny model's context is 2048 tokens; this is about 2200, and still under maxInputBytes.
  exam('prompt longer than the model context', () => ({ prompt: 'genre '.repeat(2200) }), {
    code: 'INVALID_ARGUMENT',
    reason: 'PROMPT_TOO_LONG',
    field: 'prompt',
  }),
  exam('device "cuda:7"', () => ({ device: 'cuda:7' }), {
    code: 'FAILED_PRECONDITION',
    reason: 'DEVICE_UNAVAILABLE',
    field: 'device',
  }),
  exam('model neither a local path nor cached', () => ({ modelName: 'no-such-org/no-such-model' }), {
    code: 'NOT_FOUND',
    reason: 'MODEL_NOT_FOUND',
    field: 'model_name',
  }),
  exam(
    'model outside security.modelRoots',
    (fx) => ({ modelName: path.join(fx.outside, 'model') }),
    outsideRoots('model_name'),
  ),
  adapterCase('adapter path missing', (bad) => bad.missing, 'NOT_FOUND', 'ADAPTER_NOT_FOUND'),
  adapterCase('adapter path a file', (bad) => bad.file, 'INVALID_ARGUMENT', 'ADAPTER_NOT_A_DIRECTORY'),
  adapterCase(
    'adapter without adapter_config.json',
    (bad) => bad.noConfig,
    'FAILED_PRECONDITION',
    'ADAPTER_CONFIG_MISSING',
  ),
  adapterCase('adapter config not JSON', (bad) => bad.configNotJson, 'FAILED_PRECONDITION', 'ADAPTER_CONFIG_INVALID'),
  adapterCase(
    'adapter config not a PEFT config',
    (bad) => bad.configNotPeft,
    'FAILED_PRECONDITION',
    'ADAPTER_CONFIG_INVALID',
  ),
  adapterCase(
    'adapter of a prompt-learning type',
    (bad) => bad.prefixTuning,
    'FAILED_PRECONDITION',
    'ADAPTER_TYPE_UNSUPPORTED',
  ),
  adapterCase('adapter without safetensors', (bad) => bad.noWeights, 'FAILED_PRECONDITION', 'ADAPTER_WEIGHTS_MISSING'),
  adapterCase(
    'adapter with only adapter_model.bin',
    (bad) => bad.pickleOnly,
    'FAILED_PRECONDITION',
    'ADAPTER_PICKLE_REFUSED',
  ),
  adapterCase(
    'adapter safetensors truncated',
    (bad) => bad.truncatedWeights,
    'FAILED_PRECONDITION',
    'ADAPTER_WEIGHTS_CORRUPT',
  ),
  adapterCase(
    'adapter safetensors corrupt',
    (bad) => bad.corruptWeights,
    'FAILED_PRECONDITION',
    'ADAPTER_WEIGHTS_CORRUPT',
  ),
  adapterCase(
    'adapter for a base of another hidden size',
    (bad) => bad.otherSize,
    'FAILED_PRECONDITION',
    'ADAPTER_INCOMPATIBLE',
  ),
  adapterCase(
    'adapter targeting modules the base lacks',
    (bad) => bad.missingTargets,
    'FAILED_PRECONDITION',
    'ADAPTER_INCOMPATIBLE',
  ),
  adapterCase(
    'adapter outside security.adapterRoots',
    (bad) => bad.outsideRoots,
    'PERMISSION_DENIED',
    'PATH_OUTSIDE_ROOTS',
  ),
  adapterCase('adapter symlink out of the roots', (bad) => bad.symlinkOut, 'PERMISSION_DENIED', 'PATH_OUTSIDE_ROOTS'),
  adapterCase('adapter path climbing out with ..', (bad) => bad.dotDotOut, 'PERMISSION_DENIED', 'PATH_OUTSIDE_ROOTS'),

  // StreamExam: the same checks before the first chunk.
  stream('empty prompt', () => ({ prompt: '' }), invalidField('prompt')),
  stream('maxNewTokens 0', () => ({ maxNewTokens: 0 }), invalidField('max_new_tokens')),
  stream('adapter path missing', (fx) => ({ adapterPath: fx.bad.missing }), {
    code: 'NOT_FOUND',
    reason: 'ADAPTER_NOT_FOUND',
    field: 'adapter_path',
  }),
  stream(
    'adapter outside security.adapterRoots',
    (fx) => ({ adapterPath: fx.bad.outsideRoots }),
    outsideRoots('adapter_path'),
  ),
  stream(
    'model outside security.modelRoots',
    (fx) => ({ modelName: path.join(fx.outside, 'model') }),
    outsideRoots('model_name'),
  ),

  // LoadAdapter.
  load('bad name', (fx) => ({ name: '2bad', adapterPath: fx.models.adapter }), invalidField('name')),
  load('missing folder', (fx) => ({ name: 'missing', adapterPath: fx.bad.missing }), {
    code: 'NOT_FOUND',
    reason: 'ADAPTER_NOT_FOUND',
    field: 'adapter_path',
  }),
  load(
    'adapter outside security.adapterRoots',
    (fx) => ({ name: 'outside', adapterPath: fx.bad.outsideRoots }),
    outsideRoots('adapter_path'),
  ),
  load(
    'model outside security.modelRoots',
    (fx) => ({ name: 'outside_model', adapterPath: fx.models.adapter, modelName: path.join(fx.outside, 'model') }),
    outsideRoots('model_name'),
  ),

  // UnloadAdapter.
  unload('bad name', '2bad', invalidField('name')),
  unload('not loaded', 'never_loaded', { code: 'NOT_FOUND', reason: 'ADAPTER_NOT_LOADED', field: 'name' }),

  // ListAdapters: it takes no fields, so only bytes that are no ListAdaptersRequest can be wrong.
  raw('undecodable bytes', 'listAdapters', UNDECODABLE, { code: 'INVALID_ARGUMENT' }),

  // CompareAdapters.
  compare('no prompts', (fx) => ({ adapters: [fx.models.adapter] }), invalidField('prompts')),
  compare('blank prompt', (fx) => ({ prompts: [PROMPT, ' '], adapters: [fx.models.adapter] }), invalidField('prompts')),
  compare(
    '9 prompts',
    (fx) => ({ prompts: Array.from({ length: 9 }, () => PROMPT), adapters: [fx.models.adapter] }),
    invalidField('prompts'),
  ),
  compare(
    '9 adapters',
    (fx) => ({
      prompts: [PROMPT],
      adapters: Array.from({ length: 9 }, (_, i) => `${fx.models.adapter}${'/.'.repeat(i)}`),
    }),
    invalidField('adapters'),
  ),
  compare('duplicate adapters', (fx) => ({ prompts: [PROMPT], adapters: [fx.models.adapter, fx.models.adapter] }), {
    code: 'INVALID_ARGUMENT',
    reason: 'DUPLICATE_ADAPTER',
    field: 'adapters',
  }),
  compare(
    'two spellings of one adapter folder',
    (fx) => ({ prompts: [PROMPT], adapters: [fx.models.adapter, `${fx.models.adapter}/./`] }),
    { code: 'INVALID_ARGUMENT', reason: 'DUPLICATE_ADAPTER', field: 'adapters' },
  ),
  compare(
    'adapter outside security.adapterRoots',
    (fx) => ({ prompts: [PROMPT], adapters: [fx.bad.outsideRoots] }),
    outsideRoots('adapters'),
  ),
  compare('missing adapter', (fx) => ({ prompts: [PROMPT], adapters: [fx.bad.missing] }), {
    code: 'NOT_FOUND',
    reason: 'ADAPTER_NOT_FOUND',
    field: 'adapters',
  }),
  compare(
    'model outside security.modelRoots',
    (fx) => ({ prompts: [PROMPT], adapters: [fx.models.adapter], modelName: path.join(fx.outside, 'model') }),
    outsideRoots('model_name'),
  ),
  compare(
    'maxNewTokens 0',
    (fx) => ({ prompts: [PROMPT], adapters: [fx.models.adapter], maxNewTokens: 0 }),
    invalidField('max_new_tokens'),
  ),

  // GradeExam: the exam file, checked whole before anything is sent (not even the plan).
  badExam('line not JSON', (exams) => exams.notJson, 2, 'not valid JSON'),
  badExam('answer a number', (exams) => exams.answerNumber, 3, 'field "answer"'),
  badExam('exam without items', (exams) => exams.empty, undefined, 'no items'),
  badExam('duplicate ids', (exams) => exams.duplicateIds, 3, 'field "id"', 'line 1'),
  grade(
    'unknown scorer in the request',
    (fx) => ({ examPath: fx.exams.good, includeBase: true, scorers: ['exact_mach'] }),
    { code: 'INVALID_ARGUMENT', reason: 'UNKNOWN_SCORER', field: 'scorers' },
    { says: () => ["'exact_mach'", "did you mean 'exact_match'"] },
  ),
  // The header beside the exam (the request names none) stands for header_path.
  grade(
    'unknown scorer in the header',
    (fx) => ({ examPath: fx.exams.unknownHeaderScorer, includeBase: true }),
    { code: 'INVALID_ARGUMENT', reason: 'INVALID_EXAM', field: 'header_path' },
    { says: (fx) => [`${fx.exams.headerUnknownScorer}:`, 'field "scorers[0]"', 'did you mean "exact_match"'] },
  ),
  grade(
    'unknown template field in the header',
    (fx) => ({ examPath: fx.exams.good, headerPath: fx.exams.headerUnknownTemplateField, includeBase: true }),
    { code: 'INVALID_ARGUMENT', reason: 'INVALID_EXAM', field: 'header_path' },
    { says: () => ['field "template"', '{questoin}', 'did you mean "question"'] },
  ),
  grade(
    'exam file missing',
    (fx) => ({ examPath: fx.exams.missing, includeBase: true }),
    { code: 'NOT_FOUND', reason: 'EXAM_NOT_FOUND', field: 'exam_path' },
    { says: (fx) => [fx.exams.missing] },
  ),
  grade('exam path a folder', (fx) => ({ examPath: fx.exams.folder, includeBase: true }), {
    code: 'INVALID_ARGUMENT',
    reason: 'EXAM_NOT_A_FILE',
    field: 'exam_path',
  }),
  grade(
    'exam outside security.examRoots',
    (fx) => ({ examPath: fx.exams.outside, includeBase: true }),
    outsideRoots('exam_path'),
  ),
  grade(
    'exam symlink out of the roots',
    (fx) => ({ examPath: fx.exams.symlinkOut, includeBase: true }),
    outsideRoots('exam_path'),
  ),
  grade(
    'exam path climbing out with ..',
    (fx) => ({ examPath: fx.exams.dotDotOut, includeBase: true }),
    outsideRoots('exam_path'),
  ),
  // The header found beside the exam stands for header_path, and is confined as it is.
  grade(
    'header beside the exam linking out of the roots',
    (fx) => ({ examPath: fx.exams.leakyHeader, includeBase: true }),
    outsideRoots('header_path'),
  ),
  grade(
    'header outside security.examRoots',
    (fx) => ({ examPath: fx.exams.good, headerPath: fx.exams.outsideHeader, includeBase: true }),
    outsideRoots('header_path'),
  ),
  grade(
    'results file outside security.examRoots',
    (fx) => ({ examPath: fx.exams.good, resumePath: fx.exams.outsideResults, includeBase: true }),
    outsideRoots('resume_path'),
  ),
  grade(
    'adapter outside security.adapterRoots',
    (fx) => ({ examPath: fx.exams.good, adapters: [fx.bad.outsideRoots] }),
    outsideRoots('adapters'),
  ),
  grade(
    'model outside security.modelRoots',
    (fx) => ({ examPath: fx.exams.good, includeBase: true, modelName: path.join(fx.outside, 'model') }),
    outsideRoots('model_name'),
  ),
  grade('no model at all', (fx) => ({ examPath: fx.exams.good }), invalidField('adapters')),
  grade(
    '9 adapters',
    (fx) => ({ examPath: fx.exams.good, adapters: Array.from({ length: 9 }, (_, i) => `n${i}`) }),
    invalidField('adapters'),
  ),
  grade('missing adapter folder', (fx) => ({ examPath: fx.exams.good, adapters: [fx.bad.missing] }), {
    code: 'NOT_FOUND',
    reason: 'ADAPTER_NOT_FOUND',
    field: 'adapters',
  }),
  grade(
    'results line not JSON, and not the last',
    (fx) => ({ examPath: fx.exams.good, includeBase: true, resumePath: fx.exams.badResults }),
    { code: 'INVALID_ARGUMENT', reason: 'INVALID_EXAM', field: 'resume_path' },
    { says: (fx) => [`${fx.exams.badResults}:1:`] },
  ),
  grade(
    'results line JSON but not an object',
    (fx) => ({ examPath: fx.exams.good, includeBase: true, resumePath: fx.exams.resultsNotObject }),
    { code: 'INVALID_ARGUMENT', reason: 'INVALID_EXAM', field: 'resume_path' },
    { says: (fx) => [`${fx.exams.resultsNotObject}:1:`] },
  ),
  // Found mid-run, as the item's window is graded: the plan went out first, and the short item
  // sharing the long one's window is never sent.
  grade(
    'item prompt longer than the context',
    (fx) => ({ examPath: fx.exams.longPrompt, includeBase: true, adapters: [fx.models.adapter] }),
    { code: 'INVALID_ARGUMENT', reason: 'PROMPT_TOO_LONG', field: 'exam_path' },
    { says: (fx) => [`${fx.exams.longPrompt}:2:`, "'long'"], streamed: ['plan'] },
  ),

  // The protocol, over gRPC only.
  {
    name: 'unknown method',
    grpc: () => ({ path: '/golem.exam.v1.ExamService/Nope', bytes: Buffer.alloc(0) }),
    expect: { code: 'UNIMPLEMENTED' },
  },
  {
    name: 'unknown service',
    grpc: () => ({ path: '/golem.exam.v9.NoService/TakeExam', bytes: Buffer.alloc(0) }),
    expect: { code: 'UNIMPLEMENTED' },
  },
  raw('bytes that do not parse as TakeExamRequest', 'takeExam', UNDECODABLE, { code: 'INVALID_ARGUMENT' }),
  raw('raw message over limits.maxMessageBytes', 'takeExam', Buffer.alloc(MiB + 1), { code: 'RESOURCE_EXHAUSTED' }),
  {
    name: 'takeExam: deadline shorter than loading the model takes',
    method: 'takeExam',
    grpc: (fx) => ({
      json: { modelName: fx.bad.unloadedModel, disableAdapter: true },
      options: { deadline: Date.now() + 30 },
    }),
    expect: { code: 'DEADLINE_EXCEEDED' },
  },
];

/** The kinds of a GradeExam stream's messages, by the oneof each one set. */
const kinds = (messages: GradeExamResponse[]): string[] =>
  messages.map((m) => Object.keys(m).find((k) => m[k as keyof GradeExamResponse] !== undefined) ?? '');

/**
 * The gRPC call a case makes: its JSON encoded through the contract, its bytes as they are, or a
 * GradeExam request through the generated client. `streamed` names what came before the status.
 */
async function sendAttempt(
  address: string,
  c: BadInputCase,
  attempt: GrpcAttempt,
  client: ExamServiceClient,
): Promise<{ error?: ServiceError; details?: ErrorDetails; streamed: string[] }> {
  if ('grade' in attempt) {
    const result = await gradeExam(client, attempt.grade, { deadline: Date.now() + 60000 });
    return { ...result, streamed: kinds(result.messages) };
  }
  const result = await sendRaw(address, c, attempt);
  return { ...result, streamed: result.messages.map(() => 'message') };
}

function sendRaw(address: string, c: BadInputCase, attempt: Exclude<GrpcAttempt, { grade: unknown }>) {
  const method = c.method && ExamServiceService[c.method];
  const target = ('path' in attempt && attempt.path) || method?.path;
  if (!target) throw new Error(`case "${c.name}" names no method`);
  if ('bytes' in attempt) return rawCall(address, target, attempt.bytes, { responseStream: method?.responseStream });
  const input = methodMessages(target)?.input;
  if (!input) throw new Error(`case "${c.name}": ${target} is not in the contract`);
  const parsed = parseRequest(JSON.stringify(attempt.json), input.typeName);
  if (!parsed.ok) throw new Error(`case "${c.name}" is not valid proto3 JSON: ${JSON.stringify(parsed.violations)}`);
  return rawCall(address, target, parsed.bytes, { ...attempt.options, responseStream: method?.responseStream });
}

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
    fx.outside = outside;
    fx.exams = badExams(path.join(dir, 'exam-files'));
    const config = tinyConfig(fx.models);
    const configFile = path.join(dir, 'golem.json');
    // The tiny models and the bad adapters (and the copied base) are inside; `outside` is not.
    const roots = [path.dirname(fx.models.adapter), dir];
    writeFileSync(
      configFile,
      JSON.stringify({
        ...config,
        logLevel: 'info',
        security: { ...config.security, adapterRoots: roots, modelRoots: roots, examRoots: [fx.exams.root] },
      }),
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

  it('has rows for every ExamService method, over gRPC and through the CLI', () => {
    const methods = Object.keys(ExamServiceService) as MethodName[];
    const uncovered = (cases: BadInputCase[]): MethodName[] =>
      methods.filter((m) => !cases.some((c) => c.method === m));
    expect(uncovered(grpcCases)).toEqual([]);
    // ListAdapters takes no input the CLI could get wrong.
    expect(uncovered(cliCases)).toEqual(['listAdapters']);
  });

  it.each(cliCases.map((c) => [c.name, c] as const))('CLI: %s', async (_name, c) => {
    const expected = c.cliExpect ?? c.expect;
    const run = await golem([...(c.cli as (fx: Fixtures) => string[])(fx), '--address', address]);
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
    const result = await sendAttempt(address, c, (c.grpc as (fx: Fixtures) => GrpcAttempt)(fx), client);
    expect(result.error && status[result.error.code]).toBe(c.expect.code);
    if (c.expect.reason !== undefined) expect(result.details?.reason).toBe(c.expect.reason);
    if (c.expect.field !== undefined)
      expect(result.details?.fieldViolations.map((v) => v.field)).toEqual([c.expect.field]);
    for (const text of c.says?.(fx) ?? []) expect(result.error?.details).toContain(text);
    expect(result.streamed).toEqual(c.streamed ?? []);
    await expectGoodRequestServed();
    if (c.method === 'gradeExam') {
      const good = await gradeExam(client, { examPath: fx.exams.good, includeBase: true });
      expect(good.error).toBeUndefined();
      expect(good.messages.at(-1)?.summary?.items).toBe(2);
    }
  });

  it('still answers a good exam through the CLI after all of it', async () => {
    const run = await golem(['exam', '{"maxNewTokens": 2}', '--address', address]);
    expect(run).toMatchObject({ code: 0, json: { status: 'success', exitCode: 0 } });
  });
});
