/**
 * The calls the gateway is answering right now, so that they can be ended on purpose: all at
 * once with UNAVAILABLE when the sidecar dies, or at the end of the shutdown grace period.
 */
import type { GrpcError } from './errors';

export class InFlightCalls {
  private readonly calls = new Set<AbortController>();
  private idleWaiters: Array<() => void> = [];

  get size(): number {
    return this.calls.size;
  }

  /**
   * Runs one call's work; `signal` aborts (with the GrpcError to answer) when `abortAll` is
   * called. The work must reject with `signal.reason` once aborted.
   */
  async run<T>(work: (signal: AbortSignal) => Promise<T>): Promise<T> {
    const controller = new AbortController();
    this.calls.add(controller);
    try {
      return await work(controller.signal);
    } finally {
      this.calls.delete(controller);
      if (this.calls.size === 0) this.wakeIdleWaiters();
    }
  }

  /** Ends every call in flight with `error`; returns how many there were. */
  abortAll(error: GrpcError): number {
    const count = this.calls.size;
    for (const controller of this.calls) controller.abort(error);
    return count;
  }

  /** Resolves once no call is in flight (at once if none is). */
  whenIdle(): Promise<void> {
    if (this.calls.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private wakeIdleWaiters(): void {
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const wake of waiters) wake();
  }
}
