import { Metadata, status } from '@grpc/grpc-js';
import { exitCodeForStatus } from '../../src/cli/exit-codes';
import { parseErrorDetails, statusError } from '../../src/gateway/errors';
import { DETAILS_KEY, ERROR_DOMAIN } from '../../src/wire';
import { Status } from '../../src/gen/google/rpc/status';

describe('status details', () => {
  it('carry one ErrorInfo and one BadRequest as google.protobuf.Any, read back unchanged', () => {
    const violations = [{ field: 'max_new_tokens', description: 'must be between 1 and 512, got 0' }];
    const error = statusError(status.INVALID_ARGUMENT, 'bad', 'INVALID_FIELD', violations);
    expect(error.code).toBe(status.INVALID_ARGUMENT);
    const raw = error.metadata?.get(DETAILS_KEY)[0] as Buffer;
    const decoded = Status.decode(raw);
    expect(decoded.code).toBe(status.INVALID_ARGUMENT);
    expect(decoded.message).toBe('bad');
    expect(decoded.details.map((d) => d.typeUrl)).toEqual([
      'type.googleapis.com/google.rpc.ErrorInfo',
      'type.googleapis.com/google.rpc.BadRequest',
    ]);
    expect(parseErrorDetails(error.metadata)).toEqual({
      reason: 'INVALID_FIELD',
      domain: ERROR_DOMAIN,
      metadata: {},
      fieldViolations: violations,
    });
  });

  it('leave out BadRequest when no field is at fault', () => {
    const error = statusError(status.UNAVAILABLE, 'down', 'SIDECAR_UNAVAILABLE');
    const decoded = Status.decode(error.metadata?.get(DETAILS_KEY)[0] as Buffer);
    expect(decoded.details).toHaveLength(1);
  });

  it('parse to nothing when there are none', () => {
    expect(parseErrorDetails(new Metadata())).toEqual({ fieldViolations: [] });
    expect(parseErrorDetails(undefined)).toEqual({ fieldViolations: [] });
  });
});

describe('exitCodeForStatus', () => {
  it.each([
    [status.OK, 0],
    [status.INVALID_ARGUMENT, 2],
    [status.NOT_FOUND, 3],
    [status.FAILED_PRECONDITION, 4],
    [status.UNAVAILABLE, 5],
    [status.DEADLINE_EXCEEDED, 6],
    [status.RESOURCE_EXHAUSTED, 7],
    [status.PERMISSION_DENIED, 8],
    [status.UNAUTHENTICATED, 9],
    [status.ALREADY_EXISTS, 10],
    [status.INTERNAL, 1],
    [status.CANCELLED, 1],
  ])('maps gRPC code %s to exit %s', (code, exit) => {
    expect(exitCodeForStatus(code)).toBe(exit);
  });
});
