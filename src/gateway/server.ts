/**
 * The gateway: a grpc-js server for ExamService, health and reflection in front of the Python
 * sidecar. It starts (and supervises) the sidecar unless told of one already running, mirrors its
 * health, and drains calls in flight on shutdown.
 */
import { Server } from '@grpc/grpc-js';
import type { GolemConfig } from '../config';
import { createLogger, type Logger } from '../log';
import { messageSizeOptions } from '../sidecar/client';
import type { LivenessSettings } from '../sidecar/liveness';
import { describeExit } from '../sidecar/process';
import { watchRemoteSidecar } from '../sidecar/remote';
import { SidecarSupervisor } from '../sidecar/supervisor';
import { LOCAL_TRANSPORT, remoteTransport } from '../sidecar/transport';
import { bearerAuthorizer } from './auth';
import { listenWithHandshakeTimeout } from './connections';
import { serverCredentials } from './credentials';
import { forwardingHandlers, rawExamService } from './forward';
import { createHealth } from './health';
import { InFlightCalls } from './in-flight';
import { gatewayInterceptors, ShutdownGate } from './interceptors';
import { GatewayMetrics, serveMetrics, type MetricsEndpoint } from './metrics';
import { createReflection } from './reflection';
import { isLoopback, sidecarConfig } from './roots';
import { SHUTTING_DOWN, SidecarLink, unavailable } from './sidecar-link';

// After the last call is answered, how long open streams (health watches) get to close politely.
const CLOSE_POLITELY_MS = 500;

export interface GatewayOptions {
  /** Where to listen instead of `config.listen` (the CLI's one-shot mode uses 127.0.0.1:0). */
  listen?: string;
  logger?: Logger;
  /** Where the bearer token is read from; process.env unless a test says otherwise. */
  env?: NodeJS.ProcessEnv;
  /** Called when the gateway gives up restarting its sidecar; it keeps answering UNAVAILABLE. */
  onSidecarFailed?: (reason: string) => void;
}

export interface Gateway {
  /** `host:port` as bound, with the real port when 0 was asked for. */
  address: string;
  port: number;
  /** The sidecar's own address (a Unix socket when the gateway spawned it). */
  sidecarAddress: string;
  /** Where GET /metrics answers (`host:port`, port as bound); undefined when metrics are off. */
  metricsAddress?: string;
  /** The process id of the sidecar the gateway spawned, if it did. */
  sidecarPid(): number | undefined;
  /**
   * Health NOT_SERVING, no new calls, calls in flight get `limits.shutdownGraceMs` to finish
   * (then UNAVAILABLE `SHUTTING_DOWN`), then the sidecar is stopped.
   */
  close(): Promise<void>;
}

/**
 * Starts the gateway: binds first (so health can say NOT_SERVING while the model loads), then
 * spawns the sidecar unless `config.sidecar.address` names one, and resolves once it is SERVING.
 */
export async function startGateway(config: GolemConfig, options: GatewayOptions = {}): Promise<Gateway> {
  const logger = options.logger ?? createLogger(config.logLevel);
  const listen = options.listen ?? config.listen;
  const credentials = serverCredentials(config.security);
  const env = options.env ?? process.env;
  const token = env[config.security.authTokenEnv];
  const remote = Boolean(config.sidecar.address);
  const transport = remote ? remoteTransport(config.sidecar, env) : LOCAL_TRANSPORT;
  const health = createHealth();
  const link = new SidecarLink(health, config.limits.maxMessageBytes, transport);
  const inFlight = new InFlightCalls();
  const shutdown = new ShutdownGate();
  const metrics = new GatewayMetrics();
  const interceptors = gatewayInterceptors({
    logger,
    production: config.production,
    authorize: bearerAuthorizer(token),
    shutdown,
    metrics,
  });
  const server = new Server({ ...messageSizeOptions(config.limits.maxMessageBytes), interceptors });
  server.addService(
    rawExamService(),
    forwardingHandlers({ logger, link, inFlight, requestTimeoutMs: config.limits.requestTimeoutMs }),
  );
  health.addToServer(server);
  createReflection().addToServer(server);
  const listener = await listenWithHandshakeTimeout(server, listen, credentials, config.limits.handshakeTimeoutMs);
  const port = listener.port;
  const address = `${listen.slice(0, listen.lastIndexOf(':'))}:${port}`;
  logSecurity(logger, config, listen, Boolean(token));
  logger.info('gateway listening', { address });

  let supervisor: SidecarSupervisor | undefined;
  let metricsEndpoint: MetricsEndpoint | undefined;
  try {
    // Up before the sidecar, like the gateway's port: a scrape while the model loads says so.
    if (config.metrics.listen) metricsEndpoint = await serveMetrics(config.metrics.listen, metrics, link, logger);
    if (!config.sidecar.address) {
      supervisor = await SidecarSupervisor.start(sidecarConfig(config, listen, logger), logger, {
        onDown: (info) => {
          // Calls on a dead sidecar would only wait for their deadline: end them now.
          const error = unavailable(`the sidecar died (${describeExit(info)}); it is being restarted, retry`);
          link.refuse(error);
          const ended = inFlight.abortAll(error);
          link.close();
          logger.warn('calls in flight ended: the sidecar died', { calls: ended });
        },
        onServing: (sidecarAddress) => link.connect(sidecarAddress, true),
        onGaveUp: (reason) => {
          link.refuse(unavailable(reason));
          options.onSidecarFailed?.(reason);
        },
      });
    }
  } catch (err) {
    listener.close();
    server.forceShutdown();
    await metricsEndpoint?.close();
    throw err;
  }
  const sidecarAddress = supervisor?.address ?? config.sidecar.address;
  link.connect(sidecarAddress, supervisor !== undefined);
  let stopWatchingRemote = (): void => undefined;
  if (remote) {
    logRemoteSidecar(logger, config, transport.interceptors.length > 0);
    stopWatchingRemote = watchRemoteSidecar(sidecarAddress, transport, livenessSettings(config), {
      onDown: (reason) => {
        // A host cut off by the network would hold calls until their deadline: end them now.
        const error = unavailable(reason);
        link.refuse(error);
        const ended = inFlight.abortAll(error);
        link.close();
        logger.warn('remote sidecar down', { sidecar: sidecarAddress, reason, calls_ended: ended });
      },
      onServing: () => {
        // A fresh channel: the old one may be sitting out its reconnect backoff.
        link.connect(sidecarAddress, true);
        logger.info('remote sidecar serving again', { sidecar: sidecarAddress });
      },
    });
  }
  logger.info('gateway ready', { address, sidecar: sidecarAddress });

  return {
    address,
    port,
    sidecarAddress,
    metricsAddress: metricsEndpoint?.address,
    sidecarPid: () => supervisor?.pid,
    close: async () => {
      logger.info('gateway shutting down', { calls_in_flight: inFlight.size, grace_ms: config.limits.shutdownGraceMs });
      shutdown.close();
      link.refuse(unavailable('the daemon is shutting down', SHUTTING_DOWN), true);
      listener.close();
      stopWatchingRemote();
      await drain(server, inFlight, config.limits.shutdownGraceMs, logger);
      link.close();
      await supervisor?.stop();
      await metricsEndpoint?.close();
      logger.info('gateway stopped', { address });
    },
  };
}

/**
 * Waits up to `graceMs` for the calls in flight (the shutdown gate already refuses new ones, with
 * a reason, which a closed port could not give), ends the rest with UNAVAILABLE `SHUTTING_DOWN`,
 * then closes the server.
 */
async function drain(server: Server, inFlight: InFlightCalls, graceMs: number, logger: Logger): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const graceOver = new Promise<'grace over'>((resolve) => {
    timer = setTimeout(() => resolve('grace over'), graceMs);
  });
  if ((await Promise.race([inFlight.whenIdle(), graceOver])) === 'grace over') {
    const ended = inFlight.abortAll(unavailable('the daemon shut down before this call finished', SHUTTING_DOWN));
    logger.warn('shutdown grace over: calls in flight ended', { calls: ended, grace_ms: graceMs });
    await inFlight.whenIdle();
  }
  clearTimeout(timer);
  const closed = new Promise<void>((resolve) => server.tryShutdown(() => resolve()));
  // The answers just sent need a moment to leave; health watches would hold the server forever.
  await Promise.race([closed, new Promise((resolve) => (timer = setTimeout(resolve, CLOSE_POLITELY_MS)))]);
  clearTimeout(timer);
  server.forceShutdown();
}

// Says once, at start-up, how the port is protected, and warns when it is open beyond loopback.
function logSecurity(logger: Logger, config: GolemConfig, listen: string, auth: boolean): void {
  const tls = Boolean(config.security.tlsCertFile);
  logger.info('gateway security', { tls, bearer_auth: auth, token_env: config.security.authTokenEnv });
  if (!isLoopback(listen) && !(tls && auth)) {
    logger.warn('listening beyond loopback without TLS and bearer auth: anyone who can reach the port can call it', {
      listen,
      tls,
      bearer_auth: auth,
    });
  }
}

function livenessSettings(config: GolemConfig): LivenessSettings {
  const { healthIntervalMs, healthTimeoutMs, healthFailures } = config.sidecar;
  return { intervalMs: healthIntervalMs, timeoutMs: healthTimeoutMs, failures: healthFailures };
}

// Says once how the link to a remote sidecar is protected; the token's variable, never its value.
function logRemoteSidecar(logger: Logger, config: GolemConfig, sendsToken: boolean): void {
  const { address, tlsCaFile, authTokenEnv } = config.sidecar;
  const tls = Boolean(tlsCaFile);
  logger.info('remote sidecar', { sidecar: address, tls, bearer_auth: sendsToken, token_env: authTokenEnv });
  if (!isLoopback(address) && !(tls && sendsToken)) {
    logger.warn(
      'the link to a sidecar beyond loopback lacks TLS or a token: others on the network may read it or call the sidecar',
      {
        sidecar: address,
        tls,
        bearer_auth: sendsToken,
      },
    );
  }
}
