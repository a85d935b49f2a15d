/**
 * Watches a sidecar the gateway did not start (`sidecar.address`, often on another host). There
 * is no process to restart and no exit to hear, and a host cut off by the network closes no
 * socket, so its health is asked on a timer: after `sidecar.healthFailures` checks in a row go
 * unanswered within `sidecar.healthTimeoutMs` it is down, and the first SERVING answer after
 * that brings it back.
 */
import { SidecarClient } from './client';
import { pollHealth, type LivenessSettings } from './liveness';
import type { SidecarTransport } from './transport';

/** What the gateway hears about its remote sidecar. */
export interface RemoteSidecarEvents {
  /** Unreachable (or not answering) `failures` times in a row; `reason` says what went wrong. */
  onDown(reason: string): void;
  /** Answered SERVING again after being down. */
  onServing(): void;
}

/**
 * Starts the checks; returns a function that stops them. The sidecar counts as up at first:
 * the gateway's own health watch says whether it serves.
 */
export function watchRemoteSidecar(
  address: string,
  transport: SidecarTransport,
  settings: LivenessSettings,
  events: RemoteSidecarEvents,
): () => void {
  let up = true;
  let misses = 0;
  return pollHealth(new SidecarClient(address, {}, transport), settings, (answer) => {
    if (up) {
      misses = answer.error ? misses + 1 : 0;
      if (answer.error && misses >= settings.failures) {
        up = false;
        events.onDown(
          `the sidecar at ${address} did not answer its health check ${misses} times in a row ` +
            `(last: ${answer.error.message}); retry`,
        );
      }
    } else if (answer.status === 'SERVING') {
      up = true;
      misses = 0;
      events.onServing();
    }
    return true;
  });
}
