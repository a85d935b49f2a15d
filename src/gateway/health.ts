/**
 * The gateway's grpc.health.v1 service. It reports what the sidecar reports, for the whole
 * server ("") and for the exam service: NOT_SERVING until the sidecar says SERVING.
 */
import { HealthImplementation, type ServingStatus } from 'grpc-health-check';
import { EXAM_SERVICE_NAME } from '../wire';

const SERVICE_NAMES = ['', EXAM_SERVICE_NAME] as const;

/** The health service, holding NOT_SERVING for both names until told otherwise. */
export function createHealth(): HealthImplementation {
  return new HealthImplementation(Object.fromEntries(SERVICE_NAMES.map((name) => [name, 'NOT_SERVING'])));
}

/** Sets one status for both names; UNKNOWN from the sidecar counts as not serving. */
export function setServing(health: HealthImplementation, status: ServingStatus): void {
  const shown = status === 'SERVING' ? 'SERVING' : 'NOT_SERVING';
  for (const name of SERVICE_NAMES) health.setStatus(name, shown);
}
