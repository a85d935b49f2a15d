/**
 * Request validation at the gateway: bad input is refused here with INVALID_ARGUMENT and one
 * field violation per bad field, so it never costs the sidecar a call. Fields left unset stay
 * unset; the sidecar fills them from its configured defaults.
 */
import type { TakeExamRequest } from '../gen/golem/exam/v1/exam';
import type { FieldViolation } from './errors';

/** The error reason the gateway gives for a request with bad fields. */
export const INVALID_FIELD_REASON = 'INVALID_FIELD';

/** Devices torch understands that golem accepts: `auto` lets the sidecar pick. */
export const DEVICE_PATTERN = /^(auto|cpu|cuda|cuda:\d+|mps)$/;

/** Compute dtypes bitsandbytes' 4-bit layers take, with and without the `torch.` prefix. */
export const COMPUTE_DTYPES: readonly string[] = [
  'float16',
  'torch.float16',
  'bfloat16',
  'torch.bfloat16',
  'float32',
  'torch.float32',
];

export interface ValidationLimits {
  maxNewTokensCap: number;
}

/** Returns every violation in the request; an empty list means it may be forwarded. */
export function validateTakeExam(request: TakeExamRequest, limits: ValidationLimits): FieldViolation[] {
  const violations: FieldViolation[] = [];
  const check = (field: string, problem: string | undefined): void => {
    if (problem !== undefined) violations.push({ field, description: problem });
  };
  check('model_name', nonBlank(request.modelName));
  check('adapter_path', nonBlank(request.adapterPath));
  check('prompt', nonBlank(request.prompt));
  check('max_new_tokens', tokenCount(request.maxNewTokens, limits.maxNewTokensCap));
  check('device', device(request.device));
  check('quantization.bnb_4bit_compute_dtype', computeDtype(request.quantization?.bnb4bitComputeDtype));
  return violations;
}

function nonBlank(value: string | undefined): string | undefined {
  if (value === undefined || value.trim() !== '') return undefined;
  return 'must not be blank when set';
}

function tokenCount(value: number | undefined, cap: number): string | undefined {
  if (value === undefined || (Number.isInteger(value) && value >= 1 && value <= cap)) return undefined;
  return `must be between 1 and ${cap}, got ${value}`;
}

function device(value: string | undefined): string | undefined {
  if (value === undefined || DEVICE_PATTERN.test(value)) return undefined;
  return `must be auto, cpu, cuda, cuda:N or mps, got ${JSON.stringify(value)}`;
}

function computeDtype(value: string | undefined): string | undefined {
  if (value === undefined || COMPUTE_DTYPES.includes(value)) return undefined;
  return `must be one of ${COMPUTE_DTYPES.join(', ')}, got ${JSON.stringify(value)}`;
}
