import { status } from '@grpc/grpc-js';
import { GrpcError, statusError } from '../../src/gateway/errors';
import { InFlightCalls } from '../../src/gateway/in-flight';

const stopped = (): GrpcError => new GrpcError(statusError(status.UNAVAILABLE, 'stopped', 'SHUTTING_DOWN'));

// Work that finishes when told, or rejects with the abort reason, as the sidecar client does.
function controllable(): { work: (signal: AbortSignal) => Promise<string>; finish: () => void } {
  let finish: () => void = () => undefined;
  const work = (signal: AbortSignal) =>
    new Promise<string>((resolve, reject) => {
      finish = () => resolve('done');
      signal.addEventListener('abort', () => reject(signal.reason as Error));
    });
  return { work, finish: () => finish() };
}

describe('InFlightCalls', () => {
  it('counts calls while they run and is idle at once when there are none', async () => {
    const calls = new InFlightCalls();
    await calls.whenIdle();
    const { work, finish } = controllable();
    const running = calls.run(work);
    expect(calls.size).toBe(1);
    let idle = false;
    void calls.whenIdle().then(() => (idle = true));
    await Promise.resolve();
    expect(idle).toBe(false);
    finish();
    await expect(running).resolves.toBe('done');
    await calls.whenIdle();
    expect(idle).toBe(true);
    expect(calls.size).toBe(0);
  });

  it('ends every call in flight with the given error', async () => {
    const calls = new InFlightCalls();
    const running = [controllable(), controllable()].map(({ work }) => calls.run(work));
    expect(calls.abortAll(stopped())).toBe(2);
    for (const call of running) await expect(call).rejects.toMatchObject({ status: { code: status.UNAVAILABLE } });
    expect(calls.size).toBe(0);
    expect(calls.abortAll(stopped())).toBe(0);
  });
});
