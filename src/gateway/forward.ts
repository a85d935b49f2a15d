/**
 * The TakeExam handler: authorize, validate, then forward to the sidecar with the caller's
 * deadline, cancellation and request id; the sidecar's answer or error (code, message, details)
 * goes back unchanged.
 */
import { randomUUID } from 'node:crypto';
import {
  Metadata,
  propagate,
  status as GrpcStatus,
  type handleUnaryCall,
  type ServerUnaryCall,
  type ServiceError,
  type StatusObject,
} from '@grpc/grpc-js';
import type { GolemConfig } from '../config';
import type { TakeExamRequest, TakeExamResponse } from '../gen/golem/exam/v1/exam';
import type { Logger } from '../log';
import type { SidecarClient } from '../sidecar/client';
import type { Authorizer } from './auth';
import { DETAILS_KEY, GrpcError, statusError } from './errors';
import type { InFlightCalls } from './in-flight';
import { SIDECAR_UNAVAILABLE, type SidecarLink } from './sidecar-link';
import { INVALID_FIELD_REASON, validateTakeExam } from './validation';

export const REQUEST_ID_KEY = 'x-request-id';

type ExamCall = ServerUnaryCall<TakeExamRequest, TakeExamResponse>;

/** What the handler needs from the gateway. */
export interface Forwarding {
  logger: Logger;
  config: GolemConfig;
  authorize: Authorizer;
  link: SidecarLink;
  inFlight: InFlightCalls;
}

/** The grpc-js handler for TakeExam. */
export function takeExamHandler(forwarding: Forwarding): handleUnaryCall<TakeExamRequest, TakeExamResponse> {
  return (call, callback) => {
    forwarding.inFlight.run((signal) => forwardTakeExam(call, forwarding, signal)).then(
      (response) => callback(null, response),
      (error: unknown) => {
        if (error instanceof GrpcError) return callback(error.status);
        forwarding.logger.error('take exam failed in the gateway', { error: String(error) });
        callback(statusError(GrpcStatus.INTERNAL, String(error), 'INTERNAL'));
      },
    );
  };
}

/** Authorizes, validates, forwards and logs one call; rejects with a GrpcError holding the status. */
async function forwardTakeExam(
  call: ExamCall,
  { logger, config, authorize, link }: Forwarding,
  signal: AbortSignal,
): Promise<TakeExamResponse> {
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
  const response = await callSidecar(link.current(), call, requestId, config.limits.requestTimeoutMs, log, signal);
  logText('answer', { answer: response.answer });
  return response;
}

/** Forwards one valid call with its request id, deadline and cancellation. */
async function callSidecar(
  client: SidecarClient,
  call: ExamCall,
  requestId: string,
  timeoutMs: number,
  log: Logger,
  signal: AbortSignal,
): Promise<TakeExamResponse> {
  const started = Date.now();
  const metadata = new Metadata();
  metadata.set(REQUEST_ID_KEY, requestId);
  try {
    const options = {
      deadline: effectiveDeadline(call, timeoutMs),
      // The caller's cancellation (and deadline) reaches the sidecar, which stops generating.
      parent: call,
      propagate_flags: propagate.DEFAULTS,
    };
    const response = await client.takeExam(call.request, metadata, options, signal);
    const tokens = { prompt_tokens: response.promptTokens, answer_tokens: response.answerTokens };
    log.info('answered', { ms: Date.now() - started, ...tokens });
    return response;
  } catch (err) {
    if (err instanceof GrpcError) {
      log.warn('call ended by the gateway', { error: err.message, ms: Date.now() - started });
      throw err;
    }
    // Anything but a status from the channel is our own bug: the handler answers INTERNAL.
    if (!isServiceError(err)) throw err;
    log.warn('sidecar error', { code: GrpcStatus[err.code], error: err.details, ms: Date.now() - started });
    throw new GrpcError(passThrough(err));
  }
}

/** The caller's deadline when it set one, else the configured request timeout. */
function effectiveDeadline(call: ExamCall, timeoutMs: number): number {
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
function setFields(request: TakeExamRequest): string[] {
  return Object.entries(request)
    .filter(([, value]) => value !== undefined && value !== false)
    .map(([key]) => key);
}
