import { Metadata, status } from '@grpc/grpc-js';
import { bearerAuthorizer } from '../../src/gateway/auth';
import { GrpcError, parseErrorDetails } from '../../src/gateway/errors';

function withAuthorization(value?: string): Metadata {
  const metadata = new Metadata();
  if (value !== undefined) metadata.set('authorization', value);
  return metadata;
}

function refusal(check: () => void): GrpcError | undefined {
  try {
    check();
  } catch (err) {
    if (err instanceof GrpcError) return err;
    throw err;
  }
  return undefined;
}

describe('bearerAuthorizer', () => {
  it('lets every call through when no token is configured', () => {
    for (const token of [undefined, '']) {
      expect(refusal(() => bearerAuthorizer(token)(withAuthorization()))).toBeUndefined();
    }
  });

  it('accepts the token with the Bearer scheme in any case', () => {
    const authorize = bearerAuthorizer('t0ken');
    expect(refusal(() => authorize(withAuthorization('Bearer t0ken')))).toBeUndefined();
    expect(refusal(() => authorize(withAuthorization('bearer t0ken')))).toBeUndefined();
  });

  it.each([
    undefined,
    '',
    'Bearer',
    'Bearer ',
    'Bearer t0ke',
    'Bearer t0kenn',
    'Basic t0ken',
    't0ken',
    'Bearer t0ken extra',
  ])('refuses %p with UNAUTHENTICATED and reason UNAUTHENTICATED', (header) => {
    const error = refusal(() => bearerAuthorizer('t0ken')(withAuthorization(header)));
    expect(error?.status.code).toBe(status.UNAUTHENTICATED);
    expect(parseErrorDetails(error?.status.metadata).reason).toBe('UNAUTHENTICATED');
    expect(error?.message).not.toContain('t0ken');
  });
});
