/**
 * A one-shot CLI command cut short by SIGINT or SIGTERM: it still prints its one JSON line
 * (CANCELLED, exit 1), and leaves nothing behind. A gateway it started in this process goes with
 * it: exiting runs each sidecar's exit hook (SIGKILL, then its socket folder removed; see
 * sidecar/process.ts), and a sidecar that somehow missed it exits when its stdin closes.
 */
import { ExitCode } from './exit-codes';

const CANCEL_SIGNALS: readonly NodeJS.Signals[] = ['SIGINT', 'SIGTERM'];

/** The line a cancelled command prints: the shape of `golem exam`'s outcome. */
export function cancelledOutcome(signal: NodeJS.Signals): Record<string, unknown> {
  return {
    status: 'failure',
    exitCode: ExitCode.FAILURE,
    message: `CANCELLED: stopped by ${signal} before the call finished`,
    detail: { code: 'CANCELLED', reason: 'CANCELLED_BY_SIGNAL', fieldViolations: [] },
  };
}

/**
 * Runs `work` (which prints nothing on stdout itself); a SIGINT or SIGTERM before it settles
 * prints the cancelled line and exits 1 at once. Waiting for a polite stop would mean waiting for
 * the call in flight, which is exactly what the signal asked not to do. `beforeExit` tidies up
 * what must not be left half-drawn (a progress line).
 */
export async function cancelOnSignal<T>(work: () => Promise<T>, beforeExit?: () => void): Promise<T> {
  const onSignal = (signal: NodeJS.Signals): void => {
    beforeExit?.();
    process.stdout.write(`${JSON.stringify(cancelledOutcome(signal))}\n`);
    process.stderr.write(`golem: error: stopped by ${signal}\n`);
    process.exit(ExitCode.FAILURE);
  };
  for (const signal of CANCEL_SIGNALS) process.on(signal, onSignal);
  try {
    return await work();
  } finally {
    for (const signal of CANCEL_SIGNALS) process.removeListener(signal, onSignal);
  }
}
