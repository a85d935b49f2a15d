/**
 * The gateway's grpc.health.v1 service. It reports what the sidecar reports, for the whole
 * server ("") and for the exam service: NOT_SERVING until the sidecar says SERVING. The name
 * `liveness` says only that the gateway itself answers (SERVING from the start, untouched by the
 * sidecar or by shutdown), so a liveness probe never restarts a gateway for its sidecar's restart.
 */
import { HealthImplementation, type ServingStatus } from 'grpc-health-check';
import { EXAM_SERVICE_NAME, LIVENESS_SERVICE_NAME } from '../wire';

const SERVICE_NAMES = ['', EXAM_SERVICE_NAME] as const;

/** The health service, holding NOT_SERVING for both sidecar names until told otherwise. */
export function createHealth(): HealthImplementation {
  const statuses: Record<string, ServingStatus> = { [LIVENESS_SERVICE_NAME]: 'SERVING' };
  for (const name of SERVICE_NAMES) statuses[name] = 'NOT_SERVING';
  return new HealthImplementation(statuses);
}

/** Sets one status for both names; UNKNOWN from the sidecar counts as not serving. */
export function setServing(health: HealthImplementation, status: ServingStatus): void {
  const shown = status === 'SERVING' ? 'SERVING' : 'NOT_SERVING';
  for (const name of SERVICE_NAMES) health.setStatus(name, shown);
}
