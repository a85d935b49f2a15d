/**
 * Starts the Python sidecar as a child process on a Unix socket in a private temp dir, waits for
 * its health to say SERVING, and stops it (SIGTERM, then SIGKILL after a grace period).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PACKAGE_ROOT, type GolemConfig } from '../config';
import type { Logger } from '../log';
import { SidecarClient } from './client';

/** Thrown when the sidecar exits, cannot be spawned, or is not ready in time. */
export class SidecarStartError extends Error {
  override name = 'SidecarStartError';
}

const POLL_INTERVAL_MS = 300;
const STDERR_TAIL_CHARS = 4000;

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export class SidecarSupervisor {
  private stderrTail = '';
  private spawnError: Error | undefined;
  private exitInfo: ExitInfo | undefined;
  private readonly exited: Promise<ExitInfo>;
  private readonly killOnExit = (): void => {
    this.child.kill('SIGKILL');
  };

  private constructor(
    private readonly child: ChildProcess,
    private readonly socketDir: string,
    /** The sidecar's gRPC address, `unix:/tmp/golem-XXXX/sidecar.sock`. */
    readonly address: string,
    private readonly logger: Logger,
  ) {
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exitInfo = { code, signal };
        resolve(this.exitInfo);
      });
      // A failed spawn (no such python) emits 'error' and never 'exit'.
      child.once('error', (err) => {
        this.spawnError = err;
        this.exitInfo = { code: null, signal: null };
        resolve(this.exitInfo);
      });
    });
    // Should this process die without stopping us, take the sidecar down with it.
    process.once('exit', this.killOnExit);
  }

  /** Spawns the sidecar for this config and resolves once its health is SERVING. */
  static async start(config: GolemConfig, logger: Logger): Promise<SidecarSupervisor> {
    const socketDir = mkdtempSync(path.join(os.tmpdir(), 'golem-'));
    const address = `unix:${path.join(socketDir, 'sidecar.sock')}`;
    const python = resolvePython(config.sidecar.python);
    const args = ['-m', 'golem_sidecar', '--listen', address, '--config-json', JSON.stringify(config)];
    logger.info('starting sidecar', { python, address });
    const child = spawn(python, args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, PYTHONUNBUFFERED: '1' },
    });
    const supervisor = new SidecarSupervisor(child, socketDir, address, logger);
    supervisor.forwardOutput();
    try {
      await supervisor.waitUntilServing(config.sidecar.startTimeoutMs);
    } catch (err) {
      await supervisor.stop();
      throw err;
    }
    logger.info('sidecar ready', { address, pid: child.pid });
    return supervisor;
  }

  /** Resolves when the sidecar process ends, however that happens. */
  whenExited(): Promise<ExitInfo> {
    return this.exited;
  }

  /** Stops the sidecar: SIGTERM, then SIGKILL if it is still there after `graceMs`. */
  async stop(graceMs = 10000): Promise<void> {
    if (!this.exitInfo) {
      this.child.kill('SIGTERM');
      const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
      const info = await this.exited;
      clearTimeout(timer);
      this.logger.info('sidecar stopped', { ...info });
    }
    process.removeListener('exit', this.killOnExit);
    rmSync(this.socketDir, { recursive: true, force: true });
  }

  // The sidecar's logs (JSON lines) join ours on stderr; stdout too, keeping our stdout clean.
  private forwardOutput(): void {
    const forward = (chunk: Buffer): void => {
      process.stderr.write(chunk);
      this.stderrTail = (this.stderrTail + chunk.toString('utf8')).slice(-STDERR_TAIL_CHARS);
    };
    this.child.stdout?.on('data', forward);
    this.child.stderr?.on('data', forward);
  }

  private async waitUntilServing(timeoutMs: number): Promise<void> {
    const client = new SidecarClient(this.address);
    const deadline = Date.now() + timeoutMs;
    try {
      while (Date.now() < deadline) {
        if (this.exitInfo) throw this.exitError();
        const status = await client.checkHealth(1000).catch(() => undefined);
        if (status === 'SERVING') return;
        await Promise.race([sleep(POLL_INTERVAL_MS), this.exited]);
      }
      throw new SidecarStartError(
        `sidecar was not ready within ${timeoutMs} ms (sidecar.startTimeoutMs); last output: ${this.lastOutput()}`,
      );
    } finally {
      client.close();
    }
  }

  private exitError(): SidecarStartError {
    if (this.spawnError) {
      return new SidecarStartError(
        `cannot run the sidecar's python: ${this.spawnError.message} (set sidecar.python or GOLEM_PYTHON)`,
      );
    }
    const info = this.exitInfo;
    const how = info?.signal ? `signal ${info.signal}` : `code ${info?.code ?? 'unknown'}`;
    return new SidecarStartError(`sidecar exited (${how}) before it was ready: ${this.lastOutput()}`);
  }

  private lastOutput(): string {
    const lines = this.stderrTail.trim().split('\n');
    return lines.slice(-3).join(' | ') || '(no output)';
  }
}

/**
 * A relative interpreter path (the default `.venv/bin/python`) is looked up in the working
 * directory first, then in golem's own folder, so `npx golem` works from elsewhere too.
 */
export function resolvePython(python: string): string {
  if (path.isAbsolute(python) || !python.includes('/')) return python;
  const fromCwd = path.resolve(python);
  if (existsSync(fromCwd)) return fromCwd;
  const fromPackage = path.join(PACKAGE_ROOT, python);
  return existsSync(fromPackage) ? fromPackage : fromCwd;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
