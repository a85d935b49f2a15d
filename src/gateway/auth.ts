/**
 * Optional bearer-token auth for ExamService. The token comes from the environment variable that
 * `security.authTokenEnv` names; health and reflection stay open so probes keep working.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { status as GrpcStatus, type Metadata } from '@grpc/grpc-js';
import { AUTHORIZATION_KEY } from '../wire';
import { GrpcError, statusError } from './errors';

export const UNAUTHENTICATED_REASON = 'UNAUTHENTICATED';

/** Checks one call's metadata; throws UNAUTHENTICATED unless it carries the right token. */
export type Authorizer = (metadata: Metadata) => void;

/** An authorizer for `token`, or one that lets everything through when no token is set. */
export function bearerAuthorizer(token: string | undefined): Authorizer {
  if (!token) return () => undefined;
  // Comparing fixed-length digests keeps the time taken independent of where the bytes differ
  // and of the length of what the caller sent.
  const expected = digest(token);
  return (metadata) => {
    const header = metadata.get(AUTHORIZATION_KEY)[0];
    const match = typeof header === 'string' ? /^Bearer\s+(\S+)\s*$/i.exec(header) : null;
    if (match && timingSafeEqual(digest(match[1]), expected)) return;
    const message = match
      ? 'the bearer token is not valid'
      : 'this call needs metadata "authorization: Bearer <token>"';
    throw new GrpcError(statusError(GrpcStatus.UNAUTHENTICATED, message, UNAUTHENTICATED_REASON));
  };
}

function digest(text: string): Buffer {
  return createHash('sha256').update(text, 'utf8').digest();
}
