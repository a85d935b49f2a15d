/**
 * The gateway port's credentials: TLS when `security.tlsCertFile` and `security.tlsKeyFile` name
 * PEM files (the schema makes sure it is both or neither), plaintext otherwise.
 */
import { readFileSync } from 'node:fs';
import { ServerCredentials } from '@grpc/grpc-js';
import { ConfigError, type GolemConfig } from '../config';

/** Builds the server credentials; an unreadable PEM file is a ConfigError naming its key. */
export function serverCredentials(security: GolemConfig['security']): ServerCredentials {
  if (!security.tlsCertFile) return ServerCredentials.createInsecure();
  const certChain = readPem(security.tlsCertFile, 'security.tlsCertFile');
  const privateKey = readPem(security.tlsKeyFile, 'security.tlsKeyFile');
  // No client certificates: callers authenticate with the bearer token, if at all.
  return ServerCredentials.createSsl(null, [{ cert_chain: certChain, private_key: privateKey }], false);
}

function readPem(file: string, key: string): Buffer {
  try {
    return readFileSync(file);
  } catch (err) {
    throw new ConfigError(`${key}: cannot read ${file}: ${(err as Error).message}`);
  }
}
