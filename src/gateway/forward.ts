/**
 * The ExamService handlers: authorize, validate, then forward to the sidecar with the caller's
 * deadline, cancellation and request id; the sidecar's answer or error (code, message, details)
 * goes back unchanged. Unary RPCs share one forwarder; StreamExam passes the sidecar's stream
 * through chunk by chunk.
 */
import { randomUUID } from 'node:crypto';
import {
  Metadata,
  propagate,
  status as GrpcStatus,
  type CallOptions,
  type handleServerStreamingCall,
  type handleUnaryCall,
  type ServerUnaryCall,
  type ServerWritableStream,
  type ServiceError,
  type StatusObject,
} from '@grpc/grpc-js';
import type { GolemConfig } from '../config';
import type { ExamChunk, TakeExamRequest, TakeExamResponse } from '../gen/golem/exam/v1/exam';
import type { Logger } from '../log';
import type { SidecarClient } from '../sidecar/client';
import type { Authorizer } from './auth';
import { DETAILS_KEY, GrpcError, statusError, type FieldViolation } from './errors';
import type { InFlightCalls } from './in-flight';
import { SIDECAR_UNAVAILABLE, type SidecarLink } from './sidecar-link';
import { INVALID_FIELD_REASON, validateTakeExam } from './validation';

export const REQUEST_ID_KEY = 'x-request-id';

/** A call as the handlers see it: unary or server-streaming, the same for what we read. */
type IncomingCall<Req> = ServerUnaryCall<Req, unknown> | ServerWritableStream<Req, unknown>;

/** What the handlers need from the gateway. */
export interface Forwarding {
  logger: Logger;
  config: GolemConfig;
  authorize: Authorizer;
  link: SidecarLink;
  inFlight: InFlightCalls;
}

/** How one unary RPC is forwarded. */
export interface UnaryRoute<Req, Res> {
  /** For the logs: `take exam`, `load adapter`, ... */
  name: string;
  /** The gateway's own checks; left out, the sidecar validates alone. */
  validate?: (request: Req, config: GolemConfig) => FieldViolation[];
  /** Calls the sidecar; rejects with its ServiceError, or with `signal.reason` once aborted. */
  invoke: (client: SidecarClient, request: Req, metadata: Metadata, options: Partial<CallOptions>, signal: AbortSignal) => Promise<Res>;
  /** Log fields for the answer, at info level. */
  summary?: (response: Res) => object;
}

/** One forwarded call: its request id, its logger and the call options for the sidecar. */
interface Admitted {
  log: Logger;
  metadata: Metadata;
  options: Partial<CallOptions>;
}

/** The grpc-js handler for a unary RPC forwarded along `route`. */
export function unaryHandler<Req, Res>(forwarding: Forwarding, route: UnaryRoute<Req, Res>): handleUnaryCall<Req, Res> {
  return (call, callback) => {
    forwarding.inFlight
      .run(async (signal) => {
        const { log, metadata, options } = admit(call, forwarding, route.name, route.validate);
        const started = Date.now();
        try {
          const response = await route.invoke(forwarding.link.current(), call.request, metadata, options, signal);
          log.info('answered', { ms: Date.now() - started, ...route.summary?.(response) });
          return response;
        } catch (err) {
          throw sidecarFailure(err, log, started);
        }
      })
      .then(
        (response) => callback(null, response),
        (error: unknown) => callback(toStatus(error, forwarding.logger, route.name)),
      );
  };
}

/** TakeExam: the gateway validates, and logs prompt and answer at debug level outside production. */
export function takeExamRoute(config: GolemConfig): UnaryRoute<TakeExamRequest, TakeExamResponse> {
  const logText = textLogger(config);
  return {
    name: 'take exam',
    validate: (request) => validateTakeExam(request, config.limits),
    invoke: (client, request, metadata, options, signal) => client.takeExam(request, metadata, options, signal),
    summary: (response) => {
      logText('answer', { answer: response.answer });
      return { prompt_tokens: response.promptTokens, answer_tokens: response.answerTokens };
    },
  };
}

/**
 * The grpc-js handler for StreamExam: the sidecar's chunks go to the caller as they come. The
 * caller's cancellation (or deadline) cancels the sidecar's stream, which stops that generation.
 */
export function streamExamHandler(forwarding: Forwarding): handleServerStreamingCall<TakeExamRequest, ExamChunk> {
  return (call) => {
    forwarding.inFlight.run((signal) => forwardStream(call, forwarding, signal)).then(
      () => call.end(),
      (error: unknown) => {
        // A caller who cancelled hears nothing more.
        if (!call.cancelled) call.emit('error', toStatus(error, forwarding.logger, 'stream exam'));
      },
    );
  };
}

async function forwardStream(
  call: ServerWritableStream<TakeExamRequest, ExamChunk>,
  forwarding: Forwarding,
  signal: AbortSignal,
): Promise<void> {
  const { log, metadata, options } = admit(call, forwarding, 'stream exam', (request, config) =>
    validateTakeExam(request, config.limits),
  );
  const started = Date.now();
  const upstream = forwarding.link.current().streamExam(call.request, metadata, options);
  const logText = textLogger(forwarding.config, log);
  try {
    await new Promise<void>((resolve, reject) => {
      const onAbort = (): void => {
        reject(signal.reason as Error);
        upstream.cancel();
      };
      signal.addEventListener('abort', onAbort, { once: true });
      // `parent` propagates cancellation too; this also covers a caller gone before it applies.
      call.once('cancelled', () => upstream.cancel());
      upstream.on('data', (chunk: ExamChunk) => {
        if (chunk.final) {
          const { promptTokens, answerTokens } = chunk.final;
          log.info('answered', { ms: Date.now() - started, prompt_tokens: promptTokens, answer_tokens: answerTokens });
          logText('answer', { answer: chunk.final.answer });
        }
        // Backpressure: a slow reader slows the sidecar's stream instead of filling our memory.
        if (!call.write(chunk)) {
          upstream.pause();
          call.once('drain', () => upstream.resume());
        }
      });
      upstream.on('error', (error) => {
        signal.removeEventListener('abort', onAbort);
        reject(error);
      });
      upstream.on('status', (status: StatusObject) => {
        signal.removeEventListener('abort', onAbort);
        if (status.code === GrpcStatus.OK) resolve();
      });
    });
  } catch (err) {
    throw sidecarFailure(err, log, started);
  }
}

/**
 * Sends the request id back, authorizes, logs and validates one call; throws a GrpcError to
 * refuse it. Returns what forwarding it needs.
 */
function admit<Req>(
  call: IncomingCall<Req>,
  { logger, config, authorize }: Forwarding,
  name: string,
  validate?: (request: Req, config: GolemConfig) => FieldViolation[],
): Admitted {
  const requestId = incomingRequestId(call.metadata) ?? randomUUID();
  const log = logger.child({ request_id: requestId });
  const headers = new Metadata();
  headers.set(REQUEST_ID_KEY, requestId);
  call.sendMetadata(headers);
  try {
    authorize(call.metadata);
  } catch (err) {
    // Never the header itself: a near-miss token is still a secret.
    log.warn('unauthenticated call refused', { peer: call.getPeer() });
    throw err;
  }
  log.info(name, { peer: call.getPeer(), fields: setFields(call.request) });
  // Prompts are the caller's data: debug level only, and never in production.
  const prompt = (call.request as { prompt?: unknown }).prompt;
  if (prompt !== undefined) textLogger(config, log)(`${name} prompt`, { prompt });

  const violations = validate?.(call.request, config) ?? [];
  if (violations.length > 0) {
    log.warn('invalid request', { violations });
    const message = violations.map((v) => `${v.field}: ${v.description}`).join('; ');
    throw new GrpcError(statusError(GrpcStatus.INVALID_ARGUMENT, message, INVALID_FIELD_REASON, violations));
  }
  const metadata = new Metadata();
  metadata.set(REQUEST_ID_KEY, requestId);
  const options = {
    deadline: effectiveDeadline(call, config.limits.requestTimeoutMs),
    // The caller's cancellation (and deadline) reaches the sidecar, which stops generating.
    parent: call,
    propagate_flags: propagate.DEFAULTS,
  };
  return { log, metadata, options };
}

/** Logs caller text (prompts, answers) at debug level, and never in production. */
function textLogger(config: GolemConfig, log?: Logger): (message: string, text: object) => void {
  if (config.production || !log) return () => undefined;
  return (message, text) => log.debug(message, text);
}

/** What a failed forward rejects with: the sidecar's status, or the gateway's own error. */
function sidecarFailure(err: unknown, log: Logger, started: number): unknown {
  if (err instanceof GrpcError) {
    log.warn('call ended by the gateway', { error: err.message, ms: Date.now() - started });
    return err;
  }
  // Anything but a status from the channel is our own bug: the handler answers INTERNAL.
  if (!isServiceError(err)) return err;
  log.warn('sidecar error', { code: GrpcStatus[err.code], error: err.details, ms: Date.now() - started });
  return new GrpcError(passThrough(err));
}

/** The status a handler answers with: a GrpcError's own, else INTERNAL. */
function toStatus(error: unknown, logger: Logger, name: string): Partial<StatusObject> {
  if (error instanceof GrpcError) return error.status;
  logger.error(`${name} failed in the gateway`, { error: String(error) });
  return statusError(GrpcStatus.INTERNAL, String(error), 'INTERNAL');
}

/** The caller's deadline when it set one, else the configured request timeout. */
function effectiveDeadline(call: IncomingCall<unknown>, timeoutMs: number): number {
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
    const reason = error.code === GrpcStatus.UNAVAILABLE ? SIDECAR_UNAVAILABLE : GrpcStatus[error.code];
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
function setFields(request: unknown): string[] {
  return Object.entries(request as object)
    .filter(([, value]) => value !== undefined && value !== false && !(Array.isArray(value) && value.length === 0))
    .map(([key]) => key);
}
