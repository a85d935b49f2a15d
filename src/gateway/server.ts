/**
 * The gateway: a grpc-js server for ExamService, health and reflection. Each TakeExam is
 * validated here, then forwarded to the Python sidecar with the caller's deadline, cancellation
 * and request id; the sidecar's answer or error (code, message, details) goes back unchanged.
 */
import { randomUUID } from 'node:crypto';
import {
  Metadata,
  propagate,
  Server,
  ServerCredentials,
  status as GrpcStatus,
  type handleUnaryCall,
  type ServerUnaryCall,
  type ServiceError,
  type StatusObject,
} from '@grpc/grpc-js';
import type { HealthImplementation } from 'grpc-health-check';
import type { GolemConfig } from '../config';
import { ExamServiceService, type TakeExamRequest, type TakeExamResponse } from '../gen/golem/exam/v1/exam';
import { createLogger, type Logger } from '../log';
import { SidecarClient } from '../sidecar/client';
import { SidecarSupervisor, type ExitInfo } from '../sidecar/supervisor';
import { DETAILS_KEY, GrpcError, statusError } from './errors';
import { createHealth, setServing } from './health';
import { createReflection } from './reflection';
import { INVALID_FIELD_REASON, validateTakeExam } from './validation';

export const REQUEST_ID_KEY = 'x-request-id';
const SHUTDOWN_GRACE_MS = 5000;

export interface GatewayOptions {
  /** Where to listen instead of `config.listen` (the CLI's one-shot mode uses 127.0.0.1:0). */
  listen?: string;
  logger?: Logger;
  /** Called when a sidecar the gateway spawned dies while the gateway is still serving. */
  onSidecarExit?: (info: ExitInfo) => void;
}

export interface Gateway {
  /** `host:port` as bound, with the real port when 0 was asked for. */
  address: string;
  port: number;
  /** The sidecar's own address (a Unix socket when the gateway spawned it). */
  sidecarAddress: string;
  /** Stops serving, lets calls in flight finish for a moment, then stops the sidecar. */
  close(): Promise<void>;
}

/**
 * Starts the gateway: binds first (so health can say NOT_SERVING while the model loads), then
 * spawns the sidecar unless `config.sidecar.address` names one, and resolves once it is SERVING.
 */
export async function startGateway(config: GolemConfig, options: GatewayOptions = {}): Promise<Gateway> {
  const logger = options.logger ?? createLogger(config.logLevel);
  const listen = options.listen ?? config.listen;
  const health = createHealth();
  const server = new Server();
  const forwarding: Forwarding = { logger, config, client: undefined };
  server.addService(ExamServiceService, { takeExam: takeExamHandler(forwarding) });
  health.addToServer(server);
  createReflection().addToServer(server);
  const port = await bind(server, listen);
  const address = `${listen.slice(0, listen.lastIndexOf(':'))}:${port}`;
  logger.info('gateway listening', { address });

  let supervisor: SidecarSupervisor | undefined;
  try {
    if (!config.sidecar.address) supervisor = await SidecarSupervisor.start(config, logger);
  } catch (err) {
    server.forceShutdown();
    throw err;
  }
  const sidecarAddress = supervisor?.address ?? config.sidecar.address;
  const client = new SidecarClient(sidecarAddress);
  forwarding.client = client;
  if (supervisor) setServing(health, 'SERVING');
  const stopWatching = client.watchHealth((status) => setServing(health, status));

  let closing = false;
  void supervisor?.whenExited().then((info) => {
    if (closing) return;
    logger.error('sidecar exited while serving', { ...info });
    setServing(health, 'NOT_SERVING');
    options.onSidecarExit?.(info);
  });
  logger.info('gateway ready', { address, sidecar: sidecarAddress });

  return {
    address,
    port,
    sidecarAddress,
    close: async () => {
      closing = true;
      stopWatching();
      await shutdown(server, health);
      client.close();
      await supervisor?.stop();
      logger.info('gateway stopped', { address });
    },
  };
}

interface Forwarding {
  logger: Logger;
  config: GolemConfig;
  client: SidecarClient | undefined;
}

function takeExamHandler(forwarding: Forwarding): handleUnaryCall<TakeExamRequest, TakeExamResponse> {
  return (call, callback) => {
    forwardTakeExam(call, forwarding).then(
      (response) => callback(null, response),
      (error: unknown) => {
        if (error instanceof GrpcError) return callback(error.status);
        forwarding.logger.error('take exam failed in the gateway', { error: String(error) });
        callback(statusError(GrpcStatus.INTERNAL, String(error), 'INTERNAL'));
      },
    );
  };
}

/** Validates, forwards and logs one call; rejects with a GrpcError holding the status to send. */
async function forwardTakeExam(
  call: ServerUnaryCall<TakeExamRequest, TakeExamResponse>,
  { logger, config, client }: Forwarding,
): Promise<TakeExamResponse> {
  const requestId = incomingRequestId(call.metadata) ?? randomUUID();
  const log = logger.child({ request_id: requestId });
  const headers = new Metadata();
  headers.set(REQUEST_ID_KEY, requestId);
  call.sendMetadata(headers);
  log.info('take exam', { peer: call.getPeer(), fields: setFields(call.request) });
  // Prompts and answers are the caller's data: debug level only, and never in production.
  const logText = config.production ? () => undefined : (message: string, text: object) => log.debug(message, text);
  logText('take exam prompt', { prompt: call.request.prompt });

  const violations = validateTakeExam(call.request, config.limits);
  if (violations.length > 0) {
    log.warn('invalid request', { violations });
    const message = violations.map((v) => `${v.field}: ${v.description}`).join('; ');
    throw new GrpcError(statusError(GrpcStatus.INVALID_ARGUMENT, message, INVALID_FIELD_REASON, violations));
  }
  if (!client) {
    throw new GrpcError(statusError(GrpcStatus.UNAVAILABLE, 'the sidecar is still starting', 'SIDECAR_UNAVAILABLE'));
  }
  const response = await callSidecar(client, call, requestId, config.limits.requestTimeoutMs, log);
  logText('answer', { answer: response.answer });
  return response;
}

/** Forwards one valid call with its request id, deadline and cancellation. */
async function callSidecar(
  client: SidecarClient,
  call: ServerUnaryCall<TakeExamRequest, TakeExamResponse>,
  requestId: string,
  timeoutMs: number,
  log: Logger,
): Promise<TakeExamResponse> {
  const started = Date.now();
  const metadata = new Metadata();
  metadata.set(REQUEST_ID_KEY, requestId);
  try {
    const response = await client.takeExam(call.request, metadata, {
      deadline: effectiveDeadline(call, timeoutMs),
      // The caller's cancellation (and deadline) reaches the sidecar, which stops generating.
      parent: call,
      propagate_flags: propagate.DEFAULTS,
    });
    const tokens = { prompt_tokens: response.promptTokens, answer_tokens: response.answerTokens };
    log.info('answered', { ms: Date.now() - started, ...tokens });
    return response;
  } catch (err) {
    // Anything but a status from the channel is our own bug: the handler answers INTERNAL.
    if (!isServiceError(err)) throw err;
    log.warn('sidecar error', { code: GrpcStatus[err.code], error: err.details, ms: Date.now() - started });
    throw new GrpcError(passThrough(err));
  }
}

/** The caller's deadline when it set one, else the configured request timeout. */
function effectiveDeadline(call: ServerUnaryCall<TakeExamRequest, TakeExamResponse>, timeoutMs: number): number {
  const deadline = call.getDeadline();
  const ms = deadline instanceof Date ? deadline.getTime() : deadline;
  return Number.isFinite(ms) ? ms : Date.now() + timeoutMs;
}

/**
 * The sidecar's status goes back as it came. Errors raised by our own channel (sidecar gone,
 * deadline passed) carry no details, so we add an ErrorInfo saying which.
 */
function passThrough(error: ServiceError): Partial<StatusObject> {
  const details = error.metadata?.get(DETAILS_KEY)[0];
  if (details === undefined) {
    const reason = error.code === GrpcStatus.UNAVAILABLE ? 'SIDECAR_UNAVAILABLE' : GrpcStatus[error.code];
    return statusError(error.code, error.details, reason);
  }
  const trailers = new Metadata();
  trailers.set(DETAILS_KEY, details);
  return { code: error.code, details: error.details, metadata: trailers };
}

function isServiceError(err: unknown): err is ServiceError {
  return err instanceof Error && typeof (err as Partial<ServiceError>).code === 'number';
}

function incomingRequestId(metadata: Metadata): string | undefined {
  const value = metadata.get(REQUEST_ID_KEY)[0];
  return typeof value === 'string' && value.trim() !== '' ? value : undefined;
}

// Which fields a call set, without their values: prompts stay out of info-level logs.
function setFields(request: TakeExamRequest): string[] {
  return Object.entries(request)
    .filter(([, value]) => value !== undefined && value !== false)
    .map(([key]) => key);
}

function bind(server: Server, listen: string): Promise<number> {
  return new Promise((resolve, reject) => {
    server.bindAsync(listen, ServerCredentials.createInsecure(), (err, port) => {
      if (err) reject(new Error(`cannot listen on ${listen}: ${err.message}`));
      else resolve(port);
    });
  });
}

async function shutdown(server: Server, health: HealthImplementation): Promise<void> {
  setServing(health, 'NOT_SERVING');
  await new Promise<void>((resolve) => {
    const timer = setTimeout(() => {
      server.forceShutdown();
      resolve();
    }, SHUTDOWN_GRACE_MS);
    server.tryShutdown(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}
