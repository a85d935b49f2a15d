/**
 * The names golem puts on the wire, in one place: metadata keys, the error domain and the
 * service names. The Python sidecar spells the same names in its own wire module.
 */

/** A call's id: the caller's, else made up by the gateway; echoed back and passed to the sidecar. */
export const REQUEST_ID_KEY = 'x-request-id';

/** `Bearer <token>` when `security.authTokenEnv` names a token. */
export const AUTHORIZATION_KEY = 'authorization';

/** The serialized google.rpc.Status (ErrorInfo, BadRequest, RetryInfo) of a failed call. */
export const DETAILS_KEY = 'grpc-status-details-bin';

/** The adapter a call is about, set by the CLI (src/cli/routing.ts) for a mesh to hash on; golem never reads it. */
export const ADAPTER_ROUTING_KEY = 'x-golem-adapter';

/** The `domain` of every ErrorInfo golem sends. */
export const ERROR_DOMAIN = 'golem.dev';

/** The exam service, as registered for health checks on both processes. */
export const EXAM_SERVICE_NAME = 'golem.exam.v1.ExamService';

/**
 * A health name that is SERVING for as long as the gateway answers, whatever its sidecar is doing:
 * for liveness probes, which should restart a wedged gateway, not one whose sidecar is restarting.
 */
export const LIVENESS_SERVICE_NAME = 'liveness';

/** grpc.health.v1, open to probes without a token. */
export const HEALTH_SERVICE_NAME = 'grpc.health.v1.Health';

/** Server reflection (both versions @grpc/reflection serves), open like health. */
export const REFLECTION_SERVICE_NAMES: readonly string[] = [
  'grpc.reflection.v1.ServerReflection',
  'grpc.reflection.v1alpha.ServerReflection',
];

/** The service a method path (`/package.Service/Method`) belongs to. */
export function serviceOfPath(path: string): string {
  return path.slice(1, path.lastIndexOf('/'));
}
