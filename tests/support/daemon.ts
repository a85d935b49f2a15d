/**
 * The built `golem` command as real processes: `golem serve` daemons the tests start, signal and
 * wait for, and one-off `golem exam` runs.
 */
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../src/config';

export const GOLEM = path.join(PACKAGE_ROOT, 'bin', 'golem.js');
export const CLI_ENV: NodeJS.ProcessEnv = {
  ...process.env,
  HF_HUB_OFFLINE: '1',
  GOLEM_ADDRESS: '',
  GOLEM_AUTH_TOKEN: '',
};

/** The command runs from dist/: build it from the sources under test. */
export function buildCli(): void {
  execFileSync(path.join(PACKAGE_ROOT, 'node_modules', '.bin', 'tsc'), ['-p', 'tsconfig.build.json'], {
    cwd: PACKAGE_ROOT,
  });
}

export interface Daemon {
  child: ChildProcess;
  /** The gateway's address, once it logs "gateway ready". */
  ready: Promise<string>;
  /** The exit code (null after a signal). */
  exited: Promise<number | null>;
  /** Its log lines so far (gateway and sidecar), parsed; non-JSON lines as `{ text }`. */
  lines: Array<Record<string, unknown>>;
  /** Its stderr so far. */
  stderr(): string;
  /** Its stdout so far. */
  stdout(): string;
}

/** Starts `golem serve --config FILE`; the config must log at info level or below. */
export function serve(configFile: string, env: NodeJS.ProcessEnv = CLI_ENV): Daemon {
  return startGolem(['serve', '--config', configFile], env);
}

/**
 * Starts `golem ARGS` and follows its log lines on stderr; for commands the test signals before
 * they finish. `ready` resolves if it logs "gateway ready" (serve, and exam starting its own).
 */
export function startGolem(args: string[], env: NodeJS.ProcessEnv = CLI_ENV): Daemon {
  const child = spawn('node', [GOLEM, ...args], { env, cwd: PACKAGE_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  const lines: Array<Record<string, unknown>> = [];
  let all = '';
  let out = '';
  child.stdout?.on('data', (chunk: Buffer) => {
    out += chunk.toString();
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const ready = new Promise<string>((resolve, reject) => {
    let buffered = '';
    child.stderr?.on('data', (chunk: Buffer) => {
      all += chunk.toString();
      buffered += chunk.toString();
      const complete = buffered.split('\n');
      buffered = complete.pop() ?? '';
      for (const text of complete) {
        const line = parseLine(text);
        lines.push(line);
        if (line.message === 'gateway ready') resolve(line.address as string);
      }
    });
    void exited.then((code) => reject(new Error(`golem ${args[0]} exited early with ${code}: ${all.slice(-2000)}`)));
  });
  // Tests that never await `ready` must not see an unhandled rejection when the daemon exits.
  ready.catch(() => undefined);
  return { child, ready, exited, lines, stderr: () => all, stdout: () => out };
}

/** Stops a daemon with SIGTERM (if still running) and returns its exit code. */
export async function stopDaemon(daemon: Daemon | undefined): Promise<number | null | undefined> {
  if (!daemon) return undefined;
  if (daemon.child.exitCode === null && daemon.child.signalCode === null) daemon.child.kill('SIGTERM');
  return daemon.exited;
}

/** The pid the daemon's sidecar logged when it was last ready. */
export function sidecarPid(daemon: Daemon): number {
  const ready = daemon.lines.filter((line) => line.message === 'sidecar ready');
  return ready[ready.length - 1]?.pid as number;
}

/** The private folder holding the socket of the daemon's sidecar, as its "sidecar ready" line says. */
export function sidecarSocketDir(daemon: Daemon): string {
  const ready = daemon.lines.filter((line) => line.message === 'sidecar ready');
  const address = ready[ready.length - 1]?.address as string;
  return path.dirname(address.slice('unix:'.length));
}

/**
 * Whether a process has ended. A zombie counts as ended: an orphan is reaped by whoever adopted
 * it, which the test does not control, but it runs no more code.
 */
export function isGone(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return true;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return true;
  }
}

/** The environment a running process was started with (Linux). */
export function environmentOf(pid: number): Record<string, string> {
  const pairs = readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').filter(Boolean);
  return Object.fromEntries(pairs.map((pair) => [pair.slice(0, pair.indexOf('=')), pair.slice(pair.indexOf('=') + 1)]));
}

/** A loopback port nothing listens on (just now). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

export interface ExamRun {
  code: number;
  stdout: string;
  stderr: string;
  json: Record<string, unknown>;
}

/** Runs `golem ARGS` to completion; stdout must be exactly one JSON line. */
export function golem(args: string[], env: NodeJS.ProcessEnv = CLI_ENV): Promise<ExamRun> {
  return new Promise((resolve, reject) => {
    execFile('node', [GOLEM, ...args], { env, cwd: PACKAGE_ROOT, maxBuffer: 16 << 20 }, (error, stdout, stderr) => {
      const code = error ? Number(error.code) : 0;
      const lines = stdout.split('\n').filter(Boolean);
      if (lines.length !== 1) {
        reject(new Error(`golem ${args[0]} printed ${lines.length} lines on stdout: ${stdout}\n${stderr}`));
        return;
      }
      resolve({ code, stdout, stderr, json: JSON.parse(lines[0]) as Record<string, unknown> });
    });
  });
}

function parseLine(text: string): Record<string, unknown> {
  try {
    const value: unknown = JSON.parse(text);
    if (typeof value === 'object' && value !== null) return value as Record<string, unknown>;
  } catch {
    // Not one of the JSON log lines: a plain stderr line.
  }
  return { text };
}
