/**
 * Notices a sidecar that is alive but no longer answers: its process is there, so no exit event
 * comes, and its health watch stays open with the last status it sent (SERVING). A sidecar whose
 * event loop is blocked (a read that never returns, SIGSTOP) looks exactly like that. So its
 * health is asked on a timer, each answer due within a deadline.
 */
import { SidecarClient } from './client';

export interface LivenessSettings {
  /** How often to ask. */
  intervalMs: number;
  /** How long an answer may take. */
  timeoutMs: number;
  /** Unanswered checks in a row that make the sidecar wedged. */
  failures: number;
}

/**
 * Checks the health of the sidecar at `address` every `intervalMs`; after `failures` checks in a
 * row get no answer within `timeoutMs`, stops and calls `onWedged` with the reason. Any answer,
 * NOT_SERVING included (a sidecar shutting down still answers), resets the count. Returns a
 * function that stops the checks.
 */
export function watchLiveness(
  address: string,
  settings: LivenessSettings,
  onWedged: (reason: string) => void,
): () => void {
  const client = new SidecarClient(address);
  let misses = 0;
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  const stop = (): void => {
    stopped = true;
    clearTimeout(timer);
    client.close();
  };
  const check = async (): Promise<void> => {
    const answered = await client.checkHealth(settings.timeoutMs).then(
      () => true,
      () => false,
    );
    if (stopped) return;
    misses = answered ? 0 : misses + 1;
    if (misses >= settings.failures) {
      stop();
      onWedged(
        `its health went unanswered ${misses} times in a row, each within ${settings.timeoutMs} ms ` +
          '(sidecar.healthFailures, sidecar.healthTimeoutMs)',
      );
      return;
    }
    schedule();
  };
  const schedule = (): void => {
    timer = setTimeout(() => void check(), settings.intervalMs);
    // The checks alone must not keep a process alive that is otherwise done.
    timer.unref();
  };
  schedule();
  return stop;
}
