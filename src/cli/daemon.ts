/**
 * Reaching the daemon from a one-shot command: its address, the channel's credentials, each call's
 * metadata, and (for `exam` and `grade`) a gateway and sidecar started in this process when none
 * listens, stopped after the call.
 */
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Client, credentials, Metadata, type ChannelCredentials } from '@grpc/grpc-js';
import { ConfigError, loadConfig, type GolemConfig } from '../config';
import { startGateway } from '../gateway/server';
import { createLogger } from '../log';
import { ADAPTER_ROUTING_KEY, AUTHORIZATION_KEY, REQUEST_ID_KEY } from '../wire';
import { ExitCode } from './exit-codes';
import { failure, type ExamOutcome } from './outcome';
import { isListening } from './probe';

export const DEFAULT_ADDRESS = '127.0.0.1:50051';

/** A client for one command's calls; `close` also stops a gateway started for them. */
export interface DaemonConnection {
  client: Client;
  close(): Promise<void>;
}

/** The channel credentials for `--tls-ca` (or GOLEM_TLS_CA): TLS trusting that CA, else plaintext. */
export function channelCredentialsFor(tlsCaOption: string | undefined): ChannelCredentials | ExamOutcome {
  const tlsCa = tlsCaOption ?? (process.env.GOLEM_TLS_CA || undefined);
  try {
    return tlsCa ? credentials.createSsl(readFileSync(tlsCa)) : credentials.createInsecure();
  } catch (err) {
    const message = `cannot read the TLS CA ${tlsCa} (--tls-ca or GOLEM_TLS_CA): ${(err as Error).message}`;
    return failure(ExitCode.INVALID_INPUT, message, 'INVALID_ARGUMENT', 'INVALID_COMMAND_LINE');
  }
}

/** A command's config (`--config`, else the default) and the bearer token it names. */
export interface CliConfig {
  config: GolemConfig;
  /** From the variable `security.authTokenEnv` names; unset or empty: none. */
  token: string | undefined;
}

/** Loads the config for a command; a bad one is the command's failure (exit 2), not a crash. */
export function cliConfig(configFile: string | undefined): CliConfig | ExamOutcome {
  try {
    const config = loadConfig({ file: configFile });
    return { config, token: process.env[config.security.authTokenEnv] || undefined };
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    return failure(ExitCode.INVALID_INPUT, err.message, 'INVALID_ARGUMENT', 'INVALID_CONFIG');
  }
}

/** `--address`, else GOLEM_ADDRESS, else the default. */
export function daemonAddress(option: string | undefined): string {
  return option ?? (process.env.GOLEM_ADDRESS || DEFAULT_ADDRESS);
}

/** Metadata for one call: a fresh request id, and the bearer token when there is one. */
export function callMetadata(token: string | undefined, route?: string): { metadata: Metadata; requestId: string } {
  const requestId = randomUUID();
  const metadata = new Metadata();
  metadata.set(REQUEST_ID_KEY, requestId);
  if (token) metadata.set(AUTHORIZATION_KEY, `Bearer ${token}`);
  // The adapter the call is about, for a mesh that keeps each adapter on one replica (routing.ts).
  if (route !== undefined) metadata.set(ADAPTER_ROUTING_KEY, route);
  return { metadata, requestId };
}

/**
 * A client for the daemon at `address`; when nothing listens there, one for a gateway (and
 * sidecar) started in this process with `config`, said on stderr.
 */
export async function connectOrStart(
  address: string,
  channelCredentials: ChannelCredentials,
  config: GolemConfig,
): Promise<DaemonConnection | ExamOutcome> {
  if (await isListening(address)) {
    const client = new Client(address, channelCredentials);
    return { client, close: () => Promise.resolve(client.close()) };
  }
  process.stderr.write(`golem: no daemon at ${address}; starting one for this call\n`);
  try {
    // Any free loopback port, private to this call: plaintext, whatever the daemon's TLS setting,
    // and no metrics port (a daemon may hold it; nobody scrapes a gateway that lives one call).
    const security = { ...config.security, tlsCertFile: '', tlsKeyFile: '' };
    const gateway = await startGateway(
      { ...config, security, metrics: { listen: '' } },
      { listen: '127.0.0.1:0', logger: createLogger(config.logLevel) },
    );
    const client = new Client(gateway.address, credentials.createInsecure());
    return {
      client,
      close: async () => {
        client.close();
        await gateway.close();
      },
    };
  } catch (err) {
    const message = `no daemon is running and none could be started: ${(err as Error).message}`;
    return failure(ExitCode.UNAVAILABLE, message, 'UNAVAILABLE', 'DAEMON_UNAVAILABLE');
  }
}
