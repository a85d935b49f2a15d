/**
 * google.rpc.Status error details: built for the gateway's own errors and parsed for callers.
 * They travel in the `grpc-status-details-bin` trailer as a serialized google.rpc.Status whose
 * details are google.protobuf.Any values (one ErrorInfo, and a BadRequest for invalid input).
 */
import { Metadata, status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { BadRequest, ErrorInfo } from '../gen/google/rpc/error_details';
import { Status } from '../gen/google/rpc/status';
import type { Any } from '../gen/google/protobuf/any';
import { DETAILS_KEY, ERROR_DOMAIN } from '../wire';

/** A status a server call ends with (what an interceptor's sendStatus carries). */
export interface CallStatus {
  code: GrpcStatus;
  details: string;
  metadata?: Metadata | null;
}

/** The reason for an UNAVAILABLE that came from the gateway's channel to its sidecar. */
export const SIDECAR_UNAVAILABLE = 'SIDECAR_UNAVAILABLE';

const TYPE_PREFIX = 'type.googleapis.com/';
const ERROR_INFO_TYPE = `${TYPE_PREFIX}google.rpc.ErrorInfo`;
const BAD_REQUEST_TYPE = `${TYPE_PREFIX}google.rpc.BadRequest`;

export interface FieldViolation {
  /** The proto field name, dotted for nested fields: `quantization.bnb_4bit_compute_dtype`. */
  field: string;
  description: string;
}

/** What a caller learns from an error's details. */
export interface ErrorDetails {
  reason?: string;
  domain?: string;
  metadata?: Record<string, string>;
  fieldViolations: FieldViolation[];
}

/** A failed call, thrown inside the gateway and turned into a status at the handler's edge. */
export class GrpcError extends Error {
  override name = 'GrpcError';
  constructor(readonly status: CallStatus) {
    super(status.details);
  }
}

/** A status ready for a grpc-js server callback, carrying google.rpc.Status details. */
export function statusError(
  code: GrpcStatus,
  message: string,
  reason: string,
  fieldViolations: FieldViolation[] = [],
): CallStatus {
  const details: Any[] = [
    pack(ERROR_INFO_TYPE, ErrorInfo.encode({ reason, domain: ERROR_DOMAIN, metadata: {} }).finish()),
  ];
  if (fieldViolations.length > 0) {
    const violations = fieldViolations.map((v) => ({ ...v, reason: '', localizedMessage: undefined }));
    details.push(pack(BAD_REQUEST_TYPE, BadRequest.encode({ fieldViolations: violations }).finish()));
  }
  const metadata = new Metadata();
  metadata.set(DETAILS_KEY, Buffer.from(Status.encode({ code, message, details }).finish()));
  return { code, details: message, metadata };
}

/** Reads the ErrorInfo and BadRequest out of an error's trailers; unknown details are skipped. */
export function parseErrorDetails(metadata: Metadata | null | undefined): ErrorDetails {
  const result: ErrorDetails = { fieldViolations: [] };
  const raw = metadata?.get(DETAILS_KEY)[0];
  if (!(raw instanceof Buffer)) return result;
  for (const detail of Status.decode(raw).details) {
    if (detail.typeUrl.endsWith('/google.rpc.ErrorInfo')) {
      const info = ErrorInfo.decode(detail.value);
      Object.assign(result, { reason: info.reason, domain: info.domain, metadata: info.metadata });
    } else if (detail.typeUrl.endsWith('/google.rpc.BadRequest')) {
      for (const v of BadRequest.decode(detail.value).fieldViolations) {
        result.fieldViolations.push({ field: v.field, description: v.description });
      }
    }
  }
  return result;
}

/**
 * What a failed call answers: a GrpcError's own status; a status from the sidecar as it came
 * (only its details travel on, not the rest of its trailers); undefined for anything else, which
 * is the gateway's own bug.
 */
export function failureStatus(error: unknown): CallStatus | undefined {
  if (error instanceof GrpcError) return error.status;
  if (!isServiceError(error)) return undefined;
  const trailers = new Metadata();
  const details = error.metadata?.get(DETAILS_KEY)[0];
  if (details !== undefined) trailers.set(DETAILS_KEY, details);
  return { code: error.code, details: error.details, metadata: trailers };
}

/**
 * Every failed status leaves with an ErrorInfo: statuses made by grpc-js itself (the sidecar's
 * channel down, a deadline passed) carry none, so one naming the code is added.
 */
export function withErrorInfo(status: CallStatus): CallStatus {
  if (status.code === GrpcStatus.OK || status.metadata?.get(DETAILS_KEY).length) return status;
  const reason = status.code === GrpcStatus.UNAVAILABLE ? SIDECAR_UNAVAILABLE : GrpcStatus[status.code];
  const built = statusError(status.code, status.details ?? '', reason);
  const metadata = status.metadata?.clone() ?? new Metadata();
  if (built.metadata) metadata.merge(built.metadata);
  return { ...status, metadata };
}

export function isServiceError(error: unknown): error is ServiceError {
  return error instanceof Error && typeof (error as Partial<ServiceError>).code === 'number';
}

function pack(typeUrl: string, value: Uint8Array): Any {
  return { typeUrl, value: Buffer.from(value) };
}
