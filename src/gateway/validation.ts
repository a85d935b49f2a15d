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

/** A registered adapter's name: it becomes a peft module key, as the sidecar checks too. */
export const ADAPTER_NAME_PATTERN = /^[A-Za-z][A-Za-z0-9_-]{0,63}$/;

export const MAX_STOPS = 8;
export const MAX_STOP_CHARS = 128;

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
  check('temperature', inRange(request.temperature, 0, 100, false));
  check('top_p', inRange(request.topP, 0, 1, true));
  check('top_k', topK(request.topK));
  check('repetition_penalty', inRange(request.repetitionPenalty, 0, 10, true));
  check('stop', stopSequences(request.stop));
  check('adapter_name', adapterName(request));
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

// The sidecar's wording: `[low, high]`, or `(low, high]` when the low end is excluded.
function inRange(value: number | undefined, low: number, high: number, openLow: boolean): string | undefined {
  if (value === undefined) return undefined;
  const tooLow = openLow ? value <= low : value < low;
  // NaN fails every comparison, so it is refused by the explicit check.
  if (!tooLow && value <= high && !Number.isNaN(value)) return undefined;
  return `must be in ${openLow ? '(' : '['}${low}, ${high}], got ${value}`;
}

function topK(value: number | undefined): string | undefined {
  if (value === undefined || value >= 0) return undefined;
  return `must be 0 (all tokens) or more, got ${value}`;
}

function stopSequences(stops: string[]): string | undefined {
  if (stops.length > MAX_STOPS) return `at most ${MAX_STOPS} stop sequences, got ${stops.length}`;
  // Counted in characters (code points), as the sidecar's Python counts them.
  const fits = (stop: string): boolean => [...stop].length >= 1 && [...stop].length <= MAX_STOP_CHARS;
  if (stops.every(fits)) return undefined;
  return `each stop sequence must be 1..${MAX_STOP_CHARS} characters`;
}

function adapterName(request: TakeExamRequest): string | undefined {
  const name = request.adapterName;
  if (name === undefined) return undefined;
  if (request.adapterPath !== undefined) return 'cannot be combined with adapter_path';
  if (request.disableAdapter) return 'cannot be combined with disable_adapter';
  if (ADAPTER_NAME_PATTERN.test(name)) return undefined;
  return `${JSON.stringify(name)} is not a valid adapter name (a letter, then up to 63 of letters, digits, _ and -)`;
}
