/**
 * The one gate every call goes through: grpc-js server interceptors for the request id, logging,
 * metrics, error details, the shutdown gate and bearer auth. Handlers hold only forwarding, so an RPC added
 * to the proto gets all of this without a line of its own.
 *
 * grpc-js wraps the interceptors in array order: the first sees a call's metadata first and its
 * status last. So the request id is set before anything logs, the log line shows the status as it
 * leaves, and refusals (shutdown, auth) pass back out through error details, metrics, logging and
 * the id.
 */
import { randomUUID } from 'node:crypto';
import {
  Metadata,
  ServerInterceptingCall,
  status as GrpcStatus,
  type ServerInterceptingCallInterface,
  type ServerInterceptor,
} from '@grpc/grpc-js';
import { fromBinary, toJson, type DescMessage, type JsonValue } from '@bufbuild/protobuf';
import { methodMessages } from '../contract';
import type { Logger } from '../log';
import { HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAMES, REQUEST_ID_KEY, serviceOfPath } from '../wire';
import type { Authorizer } from './auth';
import { GrpcError, withErrorInfo, type CallStatus } from './errors';
import { callMetrics, type GatewayMetrics } from './metrics';
import { SHUTTING_DOWN, unavailable } from './sidecar-link';

// A caller's id is kept when it is printable ASCII of sane length; anything else is replaced,
// since it is echoed into every log line of the call.
const REQUEST_ID_PATTERN = /^[\x21-\x7e]{1,128}$/;

// Codes that say the gateway or the sidecar is at fault, rather than the caller.
const SERVER_FAULTS = new Set([GrpcStatus.INTERNAL, GrpcStatus.UNKNOWN, GrpcStatus.DATA_LOSS]);

/** Health and reflection stay open: no token needed, not closed by shutdown, logged at debug. */
export function isOpenMethod(path: string): boolean {
  const service = serviceOfPath(path);
  return service === HEALTH_SERVICE_NAME || REFLECTION_SERVICE_NAMES.includes(service);
}

/** Closed once shutdown begins: new gated calls are then refused with UNAVAILABLE `SHUTTING_DOWN`. */
export class ShutdownGate {
  closed = false;

  close(): void {
    this.closed = true;
  }
}

export interface GateOptions {
  logger: Logger;
  /** `production: true`: caller text (prompts, answers) is never logged, whatever the level. */
  production: boolean;
  authorize: Authorizer;
  shutdown: ShutdownGate;
  metrics: GatewayMetrics;
}

/** The gateway's interceptors, in the order grpc-js needs them (see the module comment). */
export function gatewayInterceptors(options: GateOptions): ServerInterceptor[] {
  return [
    requestIds(),
    callLogging(options.logger, options.production),
    callMetrics(options.metrics),
    errorDetails(),
    refuseGated(() => (options.shutdown.closed ? shuttingDown() : undefined)),
    refuseGated((metadata) => authorization(options.authorize, metadata)),
  ];
}

/**
 * Reads `x-request-id` or makes one up, so every later interceptor and the handler see it in the
 * call's metadata; echoes it in the response headers, even for a call refused before any answer.
 */
export function requestIds(): ServerInterceptor {
  return (_method, call) => {
    let requestId: string | undefined;
    let headersSent = false;
    const echo = (metadata: Metadata): Metadata => {
      if (requestId !== undefined) metadata.set(REQUEST_ID_KEY, requestId);
      return metadata;
    };
    return new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata, passOn) => {
            const given = metadata.get(REQUEST_ID_KEY)[0];
            requestId = typeof given === 'string' && REQUEST_ID_PATTERN.test(given) ? given : randomUUID();
            metadata.set(REQUEST_ID_KEY, requestId);
            passOn(metadata);
          },
        }),
      sendMetadata: (metadata, passOn) => {
        headersSent = true;
        passOn(echo(metadata));
      },
      sendStatus: (status, passOn) => {
        // Without this, an error would leave as trailers only and the id would not come back.
        if (!headersSent) {
          headersSent = true;
          call.sendMetadata(echo(new Metadata()));
        }
        passOn(status);
      },
    });
  };
}

/**
 * One info line per call when it ends: method, code, ms and request id. Caller text (requests,
 * answers) only at debug level, and never in production.
 */
export function callLogging(logger: Logger, production: boolean): ServerInterceptor {
  return (method, call) => {
    const started = Date.now();
    let log = logger;
    const messages = !production && logger.isDebugEnabled() ? methodMessages(method.path) : undefined;
    return new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata, passOn) => {
            log = logger.child({ request_id: metadata.get(REQUEST_ID_KEY)[0] });
            // Probes (health, reflection) come every few seconds: only their end is logged.
            if (!isOpenMethod(method.path)) log.debug('call started', { method: method.path, peer: call.getPeer() });
            passOn(metadata);
          },
          onReceiveMessage: (message: unknown, passOn) => {
            if (messages) log.debug('request', { method: method.path, request: asJson(messages.input, message) });
            passOn(message);
          },
        }),
      sendMessage: (message: unknown, passOn) => {
        if (messages) log.debug('response', { method: method.path, response: asJson(messages.output, message) });
        passOn(message);
      },
      sendStatus: (status, passOn) => {
        const line = { method: method.path, code: GrpcStatus[status.code], ms: Date.now() - started };
        const failure = status.code === GrpcStatus.OK ? {} : { error: status.details };
        if (isOpenMethod(method.path)) log.debug('call', { ...line, ...failure });
        else log.log(SERVER_FAULTS.has(status.code) ? 'warn' : 'info', 'call', { ...line, ...failure });
        passOn(status);
      },
    });
  };
}

/** Every failed status leaves with an ErrorInfo (see withErrorInfo). */
export function errorDetails(): ServerInterceptor {
  return (_method, call) =>
    new ServerInterceptingCall(call, { sendStatus: (status, passOn) => passOn(withErrorInfo(status)) });
}

/**
 * Refuses a gated (not open) call as soon as its metadata arrives when `check` returns a status;
 * the handler never starts, so nothing reaches the sidecar.
 */
export function refuseGated(check: (metadata: Metadata) => CallStatus | undefined): ServerInterceptor {
  return (method, call) => {
    if (isOpenMethod(method.path)) return new ServerInterceptingCall(call);
    return new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata, passOn) => {
            const refusal = check(metadata);
            if (refusal) refuse(call, refusal);
            else passOn(metadata);
          },
        }),
    });
  };
}

function refuse(call: ServerInterceptingCallInterface, status: CallStatus): void {
  call.sendStatus({ code: status.code, details: status.details, metadata: status.metadata ?? undefined });
}

function shuttingDown(): CallStatus {
  return unavailable('the daemon is shutting down; retry on another', SHUTTING_DOWN).status;
}

function authorization(authorize: Authorizer, metadata: Metadata): CallStatus | undefined {
  try {
    authorize(metadata);
    return undefined;
  } catch (err) {
    if (err instanceof GrpcError) return err.status;
    throw err;
  }
}

// Messages travel as bytes through the gateway; decoded here for the debug log only.
function asJson(desc: DescMessage, message: unknown): JsonValue {
  if (!(message instanceof Uint8Array)) return null;
  try {
    return toJson(desc, fromBinary(desc, message));
  } catch {
    return { undecodable_bytes: message.length };
  }
}
