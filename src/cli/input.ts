/**
 * The `golem exam` input: the seed script's JSON object, camelCase keys. Checked strictly (unknown
 * keys and wrong types are refused, naming the key); a key left out stays unset in the request
 * so the daemon's configured default applies. Value ranges are the gateway's to check.
 */
import { z } from 'zod';
import { CompareAdaptersRequest, TakeExamRequest } from '../gen/golem/exam/v1/exam';
import type { FieldViolation } from '../gateway/errors';

export const examInputSchema = z.strictObject({
  modelName: z.string().optional(),
  adapterPath: z.string().optional(),
  prompt: z.string().optional(),
  maxNewTokens: z.int32().optional(),
  device: z.string().optional(),
  quantization: z
    .strictObject({
      loadIn4Bit: z.boolean().optional(),
      bnb4BitComputeDtype: z.string().optional(),
    })
    .optional(),
  expectedAnswer: z.string().optional(),
  disableAdapter: z.boolean().optional(),
  temperature: z.number().optional(),
  topP: z.number().optional(),
  topK: z.int32().optional(),
  // A JSON number is exact only up to 2^53: larger seeds would silently change.
  seed: z.int().nonnegative().optional(),
  stop: z.array(z.string()).optional(),
  repetitionPenalty: z.number().optional(),
  adapterName: z.string().optional(),
});

export type ExamInput = z.infer<typeof examInputSchema>;

export type ParsedInput = { ok: true; request: TakeExamRequest } | { ok: false; violations: FieldViolation[] };

/** Parses the command-line JSON text into a request, or lists what is wrong with it, by key. */
export function parseExamInput(text: string): ParsedInput {
  const value = parseJsonObject(text);
  if ('violations' in value) return value;
  const parsed = examInputSchema.safeParse(value.object);
  if (!parsed.success) {
    return { ok: false, violations: parsed.error.issues.flatMap((issue) => describeIssue(issue)) };
  }
  return { ok: true, request: toTakeExamRequest(parsed.data) };
}

/** Maps the input's keys onto the request's; absent keys stay undefined. */
export function toTakeExamRequest(input: ExamInput): TakeExamRequest {
  return TakeExamRequest.fromPartial({
    modelName: input.modelName,
    adapterPath: input.adapterPath,
    prompt: input.prompt,
    maxNewTokens: input.maxNewTokens,
    device: input.device,
    quantization: input.quantization && {
      loadIn4bit: input.quantization.loadIn4Bit,
      bnb4bitComputeDtype: input.quantization.bnb4BitComputeDtype,
    },
    expectedAnswer: input.expectedAnswer,
    disableAdapter: input.disableAdapter ?? false,
    temperature: input.temperature,
    topP: input.topP,
    topK: input.topK,
    seed: input.seed,
    stop: input.stop,
    repetitionPenalty: input.repetitionPenalty,
    adapterName: input.adapterName,
  });
}

/** The `golem compare` input: one prompt or several, the adapters to set against the base. */
export const compareInputSchema = z
  .strictObject({
    prompts: z.array(z.string()).optional(),
    prompt: z.string().optional(),
    adapters: z.array(z.string()),
    modelName: z.string().optional(),
    maxNewTokens: z.int32().optional(),
  })
  .refine((input) => (input.prompts === undefined) !== (input.prompt === undefined), {
    message: 'give either prompts or prompt, not both',
    path: ['prompts'],
  });

export type ParsedCompareInput =
  | { ok: true; request: CompareAdaptersRequest }
  | { ok: false; violations: FieldViolation[] };

/** Parses `golem compare`'s JSON text into a request, or lists what is wrong with it, by key. */
export function parseCompareInput(text: string): ParsedCompareInput {
  const value = parseJsonObject(text);
  if ('violations' in value) return value;
  const parsed = compareInputSchema.safeParse(value.object);
  if (!parsed.success) {
    return { ok: false, violations: parsed.error.issues.flatMap((issue) => describeIssue(issue, false)) };
  }
  const input = parsed.data;
  return {
    ok: true,
    request: CompareAdaptersRequest.fromPartial({
      prompts: input.prompts ?? [input.prompt ?? ''],
      adapters: input.adapters,
      modelName: input.modelName,
      maxNewTokens: input.maxNewTokens,
    }),
  };
}

function parseJsonObject(text: string): { object: object } | { ok: false; violations: FieldViolation[] } {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    return { ok: false, violations: [{ field: 'input', description: `not valid JSON: ${(err as Error).message}` }] };
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    const got = Array.isArray(value) ? 'an array' : typeof value;
    return { ok: false, violations: [{ field: 'input', description: `must be a JSON object, got ${got}` }] };
  }
  return { object: value };
}

function describeIssue(issue: z.core.$ZodIssue, suggest = true): FieldViolation[] {
  const prefix = issue.path.map(String).join('.');
  if (issue.code === 'unrecognized_keys') {
    return issue.keys.map((key) => ({
      field: prefix ? `${prefix}.${key}` : key,
      description: `unknown key${suggest ? suggestion(key, issue.path) : ''}`,
    }));
  }
  return [{ field: prefix || 'input', description: issue.message }];
}

// The common slip is case (`loadIn4bit` for `loadIn4Bit`, as ts-proto spells it): name the key meant.
function suggestion(key: string, at: PropertyKey[]): string {
  const shape = at.length === 0 ? examInputSchema.shape : examInputSchema.shape.quantization.unwrap().shape;
  const meant = Object.keys(shape).find((known) => known.toLowerCase() === key.toLowerCase());
  return meant ? ` (did you mean ${meant}?)` : '';
}
