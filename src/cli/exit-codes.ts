/**
 * The `golem exam` exit codes; the JSON line on stdout carries the same number as `exitCode`.
 *
 * | code | meaning                                                              |
 * |------|----------------------------------------------------------------------|
 * | 0    | success                                                              |
 * | 1    | any other failure (INTERNAL, UNKNOWN, CANCELLED, ...)                |
 * | 2    | invalid input: bad JSON, schema error, or INVALID_ARGUMENT           |
 * | 3    | NOT_FOUND: the model or adapter does not exist                       |
 * | 4    | FAILED_PRECONDITION: e.g. 4-bit asked for where it is impossible     |
 * | 5    | UNAVAILABLE: no daemon and none could be started, or sidecar down    |
 * | 6    | DEADLINE_EXCEEDED                                                    |
 * | 7    | RESOURCE_EXHAUSTED: e.g. out of memory, message too large; back off  |
 * | 8    | PERMISSION_DENIED: e.g. a path outside security.adapterRoots         |
 * | 9    | UNAUTHENTICATED: missing or wrong bearer token                       |
 * | 10   | ALREADY_EXISTS: an adapter name that holds other weights             |
 */
import { status as GrpcStatus } from '@grpc/grpc-js';

export const ExitCode = {
  SUCCESS: 0,
  FAILURE: 1,
  INVALID_INPUT: 2,
  NOT_FOUND: 3,
  FAILED_PRECONDITION: 4,
  UNAVAILABLE: 5,
  DEADLINE_EXCEEDED: 6,
  RESOURCE_EXHAUSTED: 7,
  PERMISSION_DENIED: 8,
  UNAUTHENTICATED: 9,
  ALREADY_EXISTS: 10,
} as const;

export type ExitCode = (typeof ExitCode)[keyof typeof ExitCode];

const BY_STATUS: ReadonlyMap<GrpcStatus, ExitCode> = new Map([
  [GrpcStatus.OK, ExitCode.SUCCESS],
  [GrpcStatus.INVALID_ARGUMENT, ExitCode.INVALID_INPUT],
  [GrpcStatus.NOT_FOUND, ExitCode.NOT_FOUND],
  [GrpcStatus.FAILED_PRECONDITION, ExitCode.FAILED_PRECONDITION],
  [GrpcStatus.UNAVAILABLE, ExitCode.UNAVAILABLE],
  [GrpcStatus.DEADLINE_EXCEEDED, ExitCode.DEADLINE_EXCEEDED],
  [GrpcStatus.RESOURCE_EXHAUSTED, ExitCode.RESOURCE_EXHAUSTED],
  [GrpcStatus.PERMISSION_DENIED, ExitCode.PERMISSION_DENIED],
  [GrpcStatus.UNAUTHENTICATED, ExitCode.UNAUTHENTICATED],
  [GrpcStatus.ALREADY_EXISTS, ExitCode.ALREADY_EXISTS],
]);

/** The exit code for a gRPC status code. */
export function exitCodeForStatus(code: GrpcStatus): ExitCode {
  return BY_STATUS.get(code) ?? ExitCode.FAILURE;
}
