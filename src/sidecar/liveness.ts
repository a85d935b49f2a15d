/**
 * Notices a sidecar that is alive but no longer answers: its process is there, so no exit event
 * comes, and its health watch stays open with the last status it sent (SERVING). A sidecar whose
 * event loop is blocked (a read that never returns, SIGSTOP) looks exactly like that. So its
 * health is asked on a timer, each answer due within a deadline.
 */
import { SidecarClient, type ServingStatus } from './client';

export interface LivenessSettings {
  /** How often to ask. */
  intervalMs: number;
  /** How long an answer may take. */
  timeoutMs: number;
  /** Unanswered checks in a row that make the sidecar wedged. */
  failures: number;
}

/** One health check's outcome: the status it answered, or why it got none in time. */
export type HealthAnswer = { status: ServingStatus; error?: undefined } | { status?: undefined; error: Error };

/**
 * Asks `client` for the sidecar's health every `intervalMs`, each answer due within `timeoutMs`,
 * and hands each outcome to `onAnswer`, which returns whether to go on. The one timer loop of
 * both watches: a spawned sidecar's liveness, and a remote sidecar's reachability (remote.ts).
 * Returns a function that stops the checks (and closes the client).
 */
export function pollHealth(
  client: SidecarClient,
  settings: LivenessSettings,
  onAnswer: (answer: HealthAnswer) => boolean,
): () => void {
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  const stop = (): void => {
    stopped = true;
    clearTimeout(timer);
    client.close();
  };
  const check = async (): Promise<void> => {
    const answer = await client.checkHealth(settings.timeoutMs).then(
      (status): HealthAnswer => ({ status }),
      (error: Error): HealthAnswer => ({ error }),
    );
    if (stopped) return;
    if (onAnswer(answer)) schedule();
    else stop();
  };
  const schedule = (): void => {
    timer = setTimeout(() => void check(), settings.intervalMs);
    // The checks alone must not keep a process alive that is otherwise done.
    timer.unref();
  };
  schedule();
  return stop;
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
  let misses = 0;
  return pollHealth(new SidecarClient(address), settings, (answer) => {
    misses = answer.error ? misses + 1 : 0;
    if (misses < settings.failures) return true;
    onWedged(
      `its health went unanswered ${misses} times in a row, each within ${settings.timeoutMs} ms ` +
        '(sidecar.healthFailures, sidecar.healthTimeoutMs)',
    );
    return false;
  });
}
