/**
 * Keeps the gateway's own sidecar alive: starts it, notices when it dies (crash, SIGKILL, OOM) or
 * stops answering its health checks (then kills it), restarts it with exponential backoff, and
 * gives up after `sidecar.maxRestarts` failed starts in a row, saying why. Every incarnation
 * listens on the same Unix socket in a private temp dir.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { GolemConfig } from '../config';
import type { Logger } from '../log';
import { watchLiveness } from './liveness';
import { describeExit, SidecarProcess, SidecarStartError, type ExitInfo } from './process';

export { resolvePython, SidecarStartError, type ExitInfo } from './process';

/** How long a stopping sidecar gets between SIGTERM and SIGKILL. */
export const SIDECAR_STOP_GRACE_MS = 5000;

/** What the gateway hears from its supervisor. */
export interface SupervisorEvents {
  /** A sidecar that was serving has died; calls to it are lost, a restart follows. */
  onDown(info: ExitInfo): void;
  /** A restarted sidecar is SERVING again at `address` (not called for the first start). */
  onServing(address: string): void;
  /** Restarting failed `sidecar.maxRestarts` times in a row; nothing more will be tried. */
  onGaveUp(reason: string): void;
}

export type SupervisorState = 'serving' | 'restarting' | 'failed' | 'stopped';

export class SidecarSupervisor {
  private current: SidecarProcess;
  private stateNow: SupervisorState = 'serving';
  private failure: string | undefined;
  // Crashes in a row set the backoff exponent; a sidecar that served a while resets it.
  private crashesInARow = 0;
  private servingSince = Date.now();
  private wakeFromBackoff: (() => void) | undefined;
  private stopLiveness: () => void = () => undefined;
  // Why the supervisor itself killed the current sidecar, for the log line its exit brings.
  private killedBecause: string | undefined;

  private constructor(
    first: SidecarProcess,
    private readonly config: GolemConfig,
    private readonly socketDir: string,
    /** The sidecar's gRPC address, `unix:/tmp/golem-XXXX/sidecar.sock`, the same across restarts. */
    readonly address: string,
    private readonly logger: Logger,
    private readonly events: SupervisorEvents,
  ) {
    this.current = first;
    this.watch(first);
  }

  /**
   * Spawns the sidecar and resolves once it is SERVING. A first start that fails is not retried:
   * it is thrown (a bad python or model path will not mend itself), and nothing is left running.
   */
  static async start(config: GolemConfig, logger: Logger, events: SupervisorEvents): Promise<SidecarSupervisor> {
    const socketDir = mkdtempSync(path.join(os.tmpdir(), 'golem-'));
    const address = `unix:${path.join(socketDir, 'sidecar.sock')}`;
    const first = SidecarProcess.spawn({ config, address, socketDir, logger });
    try {
      await first.waitUntilServing(config.sidecar.startTimeoutMs);
    } catch (err) {
      await first.stop(SIDECAR_STOP_GRACE_MS);
      rmSync(socketDir, { recursive: true, force: true });
      throw err;
    }
    logger.info('sidecar ready', { address, pid: first.pid });
    return new SidecarSupervisor(first, config, socketDir, address, logger, events);
  }

  get state(): SupervisorState {
    return this.stateNow;
  }

  // A method, not a field test: `stop()` may change the state across an await.
  private get stopped(): boolean {
    return this.stateNow === 'stopped';
  }

  /** Why the supervisor gave up, once it has. */
  get failureReason(): string | undefined {
    return this.failure;
  }

  /** The running sidecar's process id (tests and the soak kill it). */
  get pid(): number | undefined {
    return this.current.pid;
  }

  /** Stops the sidecar (SIGTERM, then SIGKILL after `graceMs`) and any restart under way. */
  async stop(graceMs = SIDECAR_STOP_GRACE_MS): Promise<void> {
    this.stateNow = 'stopped';
    this.wakeFromBackoff?.();
    this.stopLiveness();
    await this.current.stop(graceMs);
    rmSync(this.socketDir, { recursive: true, force: true });
  }

  private watch(sidecar: SidecarProcess): void {
    this.killedBecause = undefined;
    const { healthIntervalMs, healthTimeoutMs, healthFailures } = this.config.sidecar;
    const settings = { intervalMs: healthIntervalMs, timeoutMs: healthTimeoutMs, failures: healthFailures };
    this.stopLiveness = watchLiveness(this.address, settings, (reason) => this.killWedged(sidecar, reason));
    void sidecar.whenExited().then((info) => {
      if (this.stateNow !== 'serving' || sidecar !== this.current) return;
      this.stopLiveness();
      this.logger.error('sidecar died', {
        how: describeExit(info),
        pid: sidecar.pid,
        ...(this.killedBecause ? { killed_because: this.killedBecause } : {}),
        last_output: sidecar.lastOutput(),
      });
      this.stateNow = 'restarting';
      // A sidecar that stayed up longer than the longest backoff was not crash-looping.
      if (Date.now() - this.servingSince > this.config.sidecar.restartBackoffMaxMs) this.crashesInARow = 0;
      this.events.onDown(info);
      void this.restart();
    });
  }

  // Alive but not answering: calls sent to it would only wait for their deadlines. Killing it
  // hands over to the usual path for a dead sidecar: health NOT_SERVING, calls ended, restart.
  private killWedged(sidecar: SidecarProcess, reason: string): void {
    if (this.stateNow !== 'serving' || sidecar !== this.current) return;
    this.killedBecause = `unresponsive: ${reason}`;
    this.logger.error('sidecar unresponsive: killing it', { pid: sidecar.pid, reason });
    sidecar.kill('SIGKILL');
  }

  private async restart(): Promise<void> {
    const { maxRestarts, restartBackoffMs, restartBackoffMaxMs, startTimeoutMs } = this.config.sidecar;
    let lastError = 'it was not restarted (sidecar.maxRestarts is 0)';
    for (let attempt = 1; attempt <= maxRestarts; attempt++) {
      const delayMs = Math.min(restartBackoffMs * 2 ** this.crashesInARow, restartBackoffMaxMs);
      this.crashesInARow++;
      this.logger.warn('restarting sidecar', { attempt, max_restarts: maxRestarts, in_ms: delayMs });
      await this.backoff(delayMs);
      if (this.stopped) return;
      // A SIGKILLed sidecar leaves its socket file behind; the new one binds the same path. One
      // that exited on its own took the whole folder with it (--cleanup-dir): make it again.
      rmSync(this.address.slice('unix:'.length), { force: true });
      mkdirSync(this.socketDir, { recursive: true, mode: 0o700 });
      this.current = SidecarProcess.spawn({
        config: this.config,
        address: this.address,
        socketDir: this.socketDir,
        logger: this.logger,
      });
      try {
        await this.current.waitUntilServing(startTimeoutMs);
      } catch (err) {
        if (this.stopped) return;
        lastError = err instanceof SidecarStartError ? err.message : String(err);
        this.logger.error('sidecar restart failed', { attempt, max_restarts: maxRestarts, error: lastError });
        await this.current.stop(SIDECAR_STOP_GRACE_MS);
        continue;
      }
      if (this.stopped) return;
      this.stateNow = 'serving';
      this.servingSince = Date.now();
      this.watch(this.current);
      this.logger.info('sidecar ready', { address: this.address, pid: this.current.pid, restarts: attempt });
      this.events.onServing(this.address);
      return;
    }
    this.stateNow = 'failed';
    this.failure = `the sidecar died and could not be restarted (${maxRestarts} failed starts in a row, sidecar.maxRestarts); last error: ${lastError}`;
    this.logger.error('sidecar given up', { reason: this.failure });
    this.events.onGaveUp(this.failure);
  }

  // A sleep that `stop()` cuts short.
  private backoff(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.wakeFromBackoff = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }
}
