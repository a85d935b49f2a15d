/**
 * How the gateway's channels reach its sidecar. The one it spawned listens on a private Unix
 * socket: plaintext, no token. A remote one (`sidecar.address`) gets TLS trusting
 * `sidecar.tlsCaFile` (unless `sidecar.allowInsecure`) and the bearer token from the variable
 * `sidecar.authTokenEnv` names, on every call, health and liveness checks included.
 */
import { readFileSync } from 'node:fs';
import {
  credentials,
  InterceptingCall,
  type ChannelCredentials,
  type ChannelOptions,
  type Interceptor,
} from '@grpc/grpc-js';
import { ConfigError, type GolemConfig } from '../config';
import { AUTHORIZATION_KEY } from '../wire';

export interface SidecarTransport {
  credentials: ChannelCredentials;
  /** Client interceptors: the one that sends the token, when there is a token. */
  interceptors: Interceptor[];
  options: ChannelOptions;
}

/** The spawned sidecar's transport. */
export const LOCAL_TRANSPORT: SidecarTransport = {
  credentials: credentials.createInsecure(),
  interceptors: [],
  options: {},
};

/** The transport to `sidecar.address`; an unreadable CA file is a ConfigError naming its key. */
export function remoteTransport(sidecar: GolemConfig['sidecar'], env: NodeJS.ProcessEnv): SidecarTransport {
  const token = env[sidecar.authTokenEnv];
  return {
    credentials: sidecar.tlsCaFile ? credentials.createSsl(readCa(sidecar.tlsCaFile)) : credentials.createInsecure(),
    interceptors: token ? [sendToken(token)] : [],
    // grpc-js waits up to 2 minutes between reconnects by default; a sidecar that is back
    // should be noticed within about one health interval.
    options: { 'grpc.max_reconnect_backoff_ms': Math.max(1000, sidecar.healthIntervalMs) },
  };
}

/** Adds `authorization: Bearer <token>` to every call; the caller's own header never travels. */
function sendToken(token: string): Interceptor {
  return (options, nextCall) =>
    new InterceptingCall(nextCall(options), {
      start: (metadata, listener, next) => {
        metadata.set(AUTHORIZATION_KEY, `Bearer ${token}`);
        next(metadata, listener);
      },
    });
}

function readCa(file: string): Buffer {
  try {
    return readFileSync(file);
  } catch (err) {
    throw new ConfigError(`sidecar.tlsCaFile: cannot read ${file}: ${(err as Error).message}`);
  }
}
