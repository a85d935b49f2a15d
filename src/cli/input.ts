/**
 * The `golem exam` input: the seed script's JSON object, camelCase keys. Checked strictly (unknown
 * keys and wrong types are refused, naming the key); a key left out stays unset in the request
 * so the daemon's configured default applies. Value ranges are the gateway's to check.
 */
import { z } from 'zod';
import type { TakeExamRequest } from '../gen/golem/exam/v1/exam';
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
});

export type ExamInput = z.infer<typeof examInputSchema>;

export type ParsedInput = { ok: true; request: TakeExamRequest } | { ok: false; violations: FieldViolation[] };

/** Parses the command-line JSON text into a request, or lists what is wrong with it, by key. */
export function parseExamInput(text: string): ParsedInput {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    return failure('input', `not valid JSON: ${(err as Error).message}`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    return failure('input', `must be a JSON object, got ${Array.isArray(value) ? 'an array' : typeof value}`);
  }
  const parsed = examInputSchema.safeParse(value);
  if (!parsed.success) {
    return { ok: false, violations: parsed.error.issues.flatMap(describeIssue) };
  }
  return { ok: true, request: toTakeExamRequest(parsed.data) };
}

/** Maps the input's keys onto the request's; absent keys stay undefined. */
export function toTakeExamRequest(input: ExamInput): TakeExamRequest {
  return {
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
  };
}

function describeIssue(issue: z.core.$ZodIssue): FieldViolation[] {
  const prefix = issue.path.map(String).join('.');
  if (issue.code === 'unrecognized_keys') {
    return issue.keys.map((key) => ({
      field: prefix ? `${prefix}.${key}` : key,
      description: `unknown key${suggestion(key, issue.path)}`,
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

function failure(field: string, description: string): ParsedInput {
  return { ok: false, violations: [{ field, description }] };
}
