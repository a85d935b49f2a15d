/**
 * The ExamService handlers, built from the generated service definition: every method is
 * forwarded to the sidecar by its path, its request and response passed through as bytes (never
 * re-encoded, so a uint64 reaches the sidecar exactly), with the caller's deadline, cancellation
 * and request id. The sidecar owns every semantic check; its answer or error goes back unchanged.
 * Request ids, auth, logging, the shutdown gate and error details are the interceptors' job.
 */
import {
  Metadata,
  propagate,
  status as GrpcStatus,
  type CallOptions,
  type handleServerStreamingCall,
  type handleUnaryCall,
  type ServerUnaryCall,
  type ServerWritableStream,
  type ServiceDefinition,
  type StatusObject,
  type UntypedServiceImplementation,
} from '@grpc/grpc-js';
import { ExamServiceService } from '../gen/golem/exam/v1/exam';
import type { Logger } from '../log';
import { identity } from '../sidecar/client';
import { REQUEST_ID_KEY } from '../wire';
import { failureStatus, statusError, type CallStatus } from './errors';
import type { InFlightCalls } from './in-flight';
import type { SidecarLink } from './sidecar-link';

/** What the handlers need from the gateway. */
export interface Forwarding {
  logger: Logger;
  link: SidecarLink;
  inFlight: InFlightCalls;
  /** The deadline given to a call whose caller set none (limits.requestTimeoutMs). */
  requestTimeoutMs: number;
}

type Method = Pick<
  (typeof ExamServiceService)[keyof typeof ExamServiceService],
  'path' | 'requestStream' | 'responseStream'
>;

/** ExamService with every message kept as its bytes, both ways. */
export function rawExamService(): ServiceDefinition {
  return Object.fromEntries(
    Object.entries(ExamServiceService).map(([name, method]: [string, Method]) => [
      name,
      {
        path: method.path,
        requestStream: method.requestStream,
        responseStream: method.responseStream,
        requestSerialize: identity,
        requestDeserialize: identity,
        responseSerialize: identity,
        responseDeserialize: identity,
      },
    ]),
  );
}

/** One forwarding handler per ExamService method, by the kind of method it is. */
export function forwardingHandlers(forwarding: Forwarding): UntypedServiceImplementation {
  return Object.fromEntries(
    Object.entries(ExamServiceService).map(([name, method]: [string, Method]) => {
      // Client streams would need the gateway to hold a call open both ways; none exist yet.
      if (method.requestStream) throw new Error(`${method.path}: client-streaming methods are not forwarded`);
      const handler = method.responseStream
        ? forwardStream(forwarding, method.path)
        : forwardUnary(forwarding, method.path);
      return [name, handler];
    }),
  );
}

function forwardUnary(forwarding: Forwarding, path: string): handleUnaryCall<Buffer, Buffer> {
  return (call, callback) => {
    forwarding.inFlight
      .run((signal) =>
        forwarding.link
          .current()
          .unary(path, call.request, sidecarMetadata(call), callOptions(call, forwarding), signal),
      )
      .then(
        (response) => callback(null, response),
        (error: unknown) => callback(asCallbackStatus(statusOf(error, forwarding.logger, path))),
      );
  };
}

/**
 * The sidecar's messages go to the caller as they come. The caller's cancellation (or deadline)
 * cancels the sidecar's stream, which stops that generation.
 */
function forwardStream(forwarding: Forwarding, path: string): handleServerStreamingCall<Buffer, Buffer> {
  return (call) => {
    forwarding.inFlight
      .run((signal) => pipeStream(call, forwarding, path, signal))
      .then(
        () => call.end(),
        (error: unknown) => {
          // A caller who cancelled hears nothing more.
          if (!call.cancelled) call.emit('error', asCallbackStatus(statusOf(error, forwarding.logger, path)));
        },
      );
  };
}

function pipeStream(
  call: ServerWritableStream<Buffer, Buffer>,
  forwarding: Forwarding,
  path: string,
  signal: AbortSignal,
): Promise<void> {
  const upstream = forwarding.link
    .current()
    .serverStream(path, call.request, sidecarMetadata(call), callOptions(call, forwarding));
  return new Promise<void>((resolve, reject) => {
    const onAbort = (): void => {
      reject(signal.reason as Error);
      upstream.cancel();
    };
    signal.addEventListener('abort', onAbort, { once: true });
    // `parent` propagates cancellation too; this also covers a caller gone before it applies.
    call.once('cancelled', () => upstream.cancel());
    upstream.on('data', (message: Buffer) => {
      // Backpressure: a slow reader slows the sidecar's stream instead of filling our memory.
      if (!call.write(message)) {
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
}

type IncomingCall = ServerUnaryCall<Buffer, Buffer> | ServerWritableStream<Buffer, Buffer>;

/** Only the request id travels on: the caller's token and other headers stay at the gateway. */
function sidecarMetadata(call: IncomingCall): Metadata {
  const metadata = new Metadata();
  const requestId = call.metadata.get(REQUEST_ID_KEY)[0];
  if (requestId !== undefined) metadata.set(REQUEST_ID_KEY, requestId);
  return metadata;
}

function callOptions(call: IncomingCall, forwarding: Forwarding): Partial<CallOptions> {
  return {
    deadline: effectiveDeadline(call, forwarding.requestTimeoutMs),
    // The caller's cancellation (and deadline) reaches the sidecar, which stops generating.
    parent: call,
    propagate_flags: propagate.DEFAULTS,
  };
}

/** The caller's deadline when it set one, else the configured request timeout. */
function effectiveDeadline(call: IncomingCall, timeoutMs: number): number {
  const deadline = call.getDeadline();
  const ms = deadline instanceof Date ? deadline.getTime() : deadline;
  return Number.isFinite(ms) ? ms : Date.now() + timeoutMs;
}

/** The status a failed forward answers with; anything but a status is the gateway's own bug. */
function statusOf(error: unknown, logger: Logger, path: string): CallStatus {
  const status = failureStatus(error);
  if (status) return status;
  logger.error('call failed in the gateway', {
    method: path,
    error: error instanceof Error ? (error.stack ?? error.message) : String(error),
  });
  return statusError(GrpcStatus.INTERNAL, String(error), 'INTERNAL');
}

// grpc-js callbacks take metadata as Metadata or nothing, never null.
function asCallbackStatus(status: CallStatus): Partial<StatusObject> {
  return { code: status.code, details: status.details, metadata: status.metadata ?? undefined };
}
