/**
 * The CLI's JSON input: the proto3 JSON of a request message (`golem exam` takes
 * TakeExamRequest's, `golem compare` CompareAdaptersRequest's), parsed through the contract's
 * descriptors, so the keys are the proto's JSON names (`maxNewTokens`, `loadIn4Bit`; the proto
 * field names are accepted too, as proto3 JSON says). Parsing is strict: an unknown key or a wrong
 * type is refused naming its key. A key left out stays unset, so the daemon's default applies.
 * Value ranges are the sidecar's to check.
 */
import { randomUUID } from 'node:crypto';
import {
  fromJson,
  ScalarType,
  toBinary,
  toJson,
  type DescField,
  type DescMessage,
  type JsonObject,
  type JsonValue,
} from '@bufbuild/protobuf';
import { messageDescriptor } from '../contract';
import type { FieldViolation } from '../gateway/errors';

export const EXAM_REQUEST_TYPE = 'golem.exam.v1.TakeExamRequest';
export const COMPARE_REQUEST_TYPE = 'golem.exam.v1.CompareAdaptersRequest';

/** A parsed request: its canonical proto3 JSON (for showing) and its wire bytes (for sending). */
export type ParsedInput =
  { ok: true; request: JsonObject; bytes: Uint8Array } | { ok: false; violations: FieldViolation[] };

/** Parses `golem exam`'s JSON text into a TakeExamRequest, or lists what is wrong with it, by key. */
export function parseExamInput(text: string): ParsedInput {
  return parseRequest(text, EXAM_REQUEST_TYPE);
}

/** Parses `golem compare`'s JSON text into a CompareAdaptersRequest, the same way. */
export function parseCompareInput(text: string): ParsedInput {
  return parseRequest(text, COMPARE_REQUEST_TYPE);
}

/** Parses JSON text as the proto3 JSON of the message `typeName`. */
export function parseRequest(text: string, typeName: string): ParsedInput {
  const desc = messageDescriptor(typeName);
  const parsed = parseJsonObject(text);
  if ('violations' in parsed) return { ok: false, violations: parsed.violations };
  const violations: FieldViolation[] = [];
  const checked = checkMessage(desc, parsed.object, [], violations, parsed.bigInts);
  if (violations.length > 0) return { ok: false, violations };
  const message = fromJson(desc, checked);
  return { ok: true, request: toJson(desc, message) as JsonObject, bytes: toBinary(desc, message) };
}

/**
 * Checks each key of `object` against the message's fields, one key at a time, so that every
 * problem names its key (dotted for nested messages). Returns the object with big integers restored.
 */
function checkMessage(
  desc: DescMessage,
  object: JsonObject,
  at: string[],
  violations: FieldViolation[],
  bigInts: BigInts,
): JsonObject {
  const checked: JsonObject = {};
  for (const [key, raw] of Object.entries(object)) {
    const path = [...at, key].join('.');
    const field = desc.fields.find((f) => f.jsonName === key || f.name === key);
    if (!field) {
      violations.push({ field: path, description: `unknown key${suggestion(desc, key)}` });
      continue;
    }
    const value = bigInts.restore(raw, field);
    if (field.fieldKind === 'message' && isObject(value)) {
      checked[key] = checkMessage(field.message, value, [...at, key], violations, bigInts);
      continue;
    }
    const problem = decodeProblem(desc, field, key, value);
    if (problem) violations.push({ field: path, description: problem });
    else checked[key] = value;
  }
  return checked;
}

// The descriptor's own JSON rules decide; their message loses its "cannot decode ..." preamble.
function decodeProblem(desc: DescMessage, field: DescField, key: string, value: JsonValue): string | undefined {
  try {
    fromJson(desc, { [key]: value });
    return undefined;
  } catch (err) {
    if (field.fieldKind === 'message') return `expected an object, got ${JSON.stringify(value)}`;
    return (err as Error).message.replace(/^cannot decode (field|message) \S+ from JSON: /, '');
  }
}

// The common slip is case (`loadIn4bit` for `loadIn4Bit`, `modelname`): name the key meant.
function suggestion(desc: DescMessage, key: string): string {
  const meant = desc.fields.find((f) => f.jsonName.toLowerCase() === key.toLowerCase());
  return meant ? ` (did you mean ${meant.jsonName}?)` : '';
}

const INT64_TYPES = new Set([
  ScalarType.INT64,
  ScalarType.UINT64,
  ScalarType.SINT64,
  ScalarType.FIXED64,
  ScalarType.SFIXED64,
]);

/**
 * JSON.parse turns an integer beyond 2^53 into the nearest double, so `seed` would silently
 * change. Such literals are read as marked strings instead, and put back per field: the exact
 * digits for a 64-bit integer field (proto3 JSON takes them as a string), a number anywhere else
 * (where the field's own rules then refuse or round it as they would have).
 */
class BigInts {
  private readonly mark = `\u0000bigint-${randomUUID()}:`;

  /** Rewrites the text's unsafe integer literals (outside strings) as marked strings. */
  protect(text: string): string {
    return text.replace(/"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g, (token) =>
      /^-?\d+$/.test(token) && !Number.isSafeInteger(Number(token)) ? JSON.stringify(this.mark + token) : token,
    );
  }

  restore(value: JsonValue, field: DescField): JsonValue {
    if (Array.isArray(value)) return value.map((item) => this.restore(item, field));
    if (typeof value !== 'string' || !value.startsWith(this.mark)) return value;
    const digits = value.slice(this.mark.length);
    const int64 =
      (field.fieldKind === 'scalar' || field.fieldKind === 'list') &&
      field.scalar !== undefined &&
      INT64_TYPES.has(field.scalar);
    return int64 ? digits : Number(digits);
  }
}

function parseJsonObject(text: string): { object: JsonObject; bigInts: BigInts } | { violations: FieldViolation[] } {
  const bigInts = new BigInts();
  let value: unknown;
  try {
    value = JSON.parse(bigInts.protect(text));
  } catch (err) {
    return { violations: [{ field: 'input', description: `not valid JSON: ${(err as Error).message}` }] };
  }
  if (!isObject(value)) {
    const got = Array.isArray(value)
      ? 'an array'
      : typeof value === 'string' && value.startsWith('\u0000')
        ? 'number'
        : typeof value;
    return { violations: [{ field: 'input', description: `must be a JSON object, got ${got}` }] };
  }
  return { object: value, bigInts };
}

function isObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
