/**
 * One Python sidecar process: spawned on a Unix socket, watched until its health says SERVING,
 * stopped with SIGTERM and then SIGKILL. Restarting is the supervisor's job, not this one's.
 * It never outlives this process: it holds a pipe to the sidecar's stdin, and the sidecar exits
 * when that pipe closes, as it does however this process ends, SIGKILL included.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
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

export interface SpawnOptions {
  /** The config the sidecar reads (the gateway may have tightened it, see gateway/roots.ts). */
  config: GolemConfig;
  /** `unix:/path/sidecar.sock`; the socket file is the caller's to clean up. */
  address: string;
  /** The private folder holding the socket: the sidecar removes it as it exits, and so does this
   * process should it exit first. */
  socketDir?: string;
  logger: Logger;
}

export class SidecarProcess {
  private stderrTail = '';
  private spawnError: Error | undefined;
  private exitInfo: ExitInfo | undefined;
  private readonly exited: Promise<ExitInfo>;
  // 'exit' handlers run synchronously: no waiting for a polite stop, so kill, and remove the
  // socket folder that a SIGKILLed sidecar cannot.
  private readonly killOnExit = (): void => {
    this.child.kill('SIGKILL');
    if (this.socketDir) rmSync(this.socketDir, { recursive: true, force: true });
  };

  private constructor(
    private readonly child: ChildProcess,
    readonly address: string,
    private readonly socketDir: string | undefined,
    private readonly logger: Logger,
  ) {
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exitInfo = { code, signal };
        process.removeListener('exit', this.killOnExit);
        resolve(this.exitInfo);
      });
      // A failed spawn (no such python) emits 'error' and never 'exit'.
      child.once('error', (err) => {
        this.spawnError = err;
        this.exitInfo = { code: null, signal: null };
        process.removeListener('exit', this.killOnExit);
        resolve(this.exitInfo);
      });
    });
    // Should this process die without stopping us, take the sidecar down with it.
    process.once('exit', this.killOnExit);
  }

  /** Spawns a sidecar; it is not serving yet (see `waitUntilServing`). */
  static spawn({ config, address, socketDir, logger }: SpawnOptions): SidecarProcess {
    const python = resolvePython(config.sidecar.python);
    const args = ['-m', 'golem_sidecar', '--listen', address, '--config-json', JSON.stringify(config)];
    args.push('--exit-with-stdin', ...(socketDir ? ['--cleanup-dir', socketDir] : []));
    logger.info('starting sidecar', { python, address, hub_downloads: config.security.allowHubDownloads });
    // stdin is a pipe that is never written to: its end of file is what the sidecar waits for.
    const child = spawn(python, args, { stdio: ['pipe', 'pipe', 'pipe'], env: sidecarEnvironment(config) });
    // Closing it, or it closing under a dead sidecar (EPIPE), is expected, never an error to throw.
    child.stdin?.on('error', () => undefined);
    const sidecar = new SidecarProcess(child, address, socketDir, logger);
    sidecar.forwardOutput();
    return sidecar;
  }

  /** Sends `signal` now, without waiting (see `stop` for the polite way). */
  kill(signal: NodeJS.Signals): void {
    if (!this.exitInfo) this.child.kill(signal);
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  /** Resolves when the process ends, however that happens. */
  whenExited(): Promise<ExitInfo> {
    return this.exited;
  }

  /** The last lines the sidecar wrote, for error messages. */
  lastOutput(): string {
    const lines = this.stderrTail.trim().split('\n');
    return lines.slice(-3).join(' | ') || '(no output)';
  }

  /** Resolves once the sidecar's health says SERVING; rejects if it exits or takes too long. */
  async waitUntilServing(timeoutMs: number): Promise<void> {
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

  /** Stops the sidecar: SIGTERM, then SIGKILL if it is still there after `graceMs`. */
  async stop(graceMs: number): Promise<void> {
    if (this.exitInfo) return;
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    const info = await this.exited;
    clearTimeout(timer);
    this.logger.info('sidecar stopped', { ...info });
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

  private exitError(): SidecarStartError {
    if (this.spawnError) {
      return new SidecarStartError(
        `cannot run the sidecar's python: ${this.spawnError.message} (set sidecar.python or GOLEM_PYTHON)`,
      );
    }
    return new SidecarStartError(
      `sidecar exited (${describeExit(this.exitInfo)}) before it was ready: ${this.lastOutput()}`,
    );
  }
}

/**
 * The sidecar's environment: ours, without the bearer tokens it has no use for, and offline
 * (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE) unless `security.allowHubDownloads` says otherwise. The
 * sidecar's code is the one shipped beside this gateway (`inference_py/` first on PYTHONPATH),
 * whichever copy the interpreter has installed: a gateway and its sidecar always come from one
 * checkout, so the contract they speak is the same.
 */
export function sidecarEnvironment(config: GolemConfig, env: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  const ownCode = path.join(PACKAGE_ROOT, 'inference_py');
  const pythonPath = [ownCode, env.PYTHONPATH].filter(Boolean).join(path.delimiter);
  const result: NodeJS.ProcessEnv = { ...env, PYTHONUNBUFFERED: '1', PYTHONPATH: pythonPath };
  delete result[config.security.authTokenEnv];
  // A token for a remote sidecar: the spawned one, on its private socket, asks for none.
  delete result[config.sidecar.authTokenEnv];
  if (!config.security.allowHubDownloads) {
    result.HF_HUB_OFFLINE = '1';
    result.TRANSFORMERS_OFFLINE = '1';
  }
  return result;
}

/** `signal SIGKILL` or `code 1`, for logs and messages. */
export function describeExit(info: ExitInfo | undefined): string {
  if (info?.signal) return `signal ${info.signal}`;
  return `code ${info?.code ?? 'unknown'}`;
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
