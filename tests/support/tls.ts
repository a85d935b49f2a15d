/** TLS material made at test time with openssl: a CA, and a server certificate it signed. */
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import path from 'node:path';

export interface CertificateAuthority {
  cert: string;
  key: string;
}

function openssl(...args: string[]): void {
  execFileSync('openssl', args, { stdio: 'ignore' });
}

/**
 * A self-signed certificate in `dir`, as `<name>.pem` and `<name>.key`: a CA, or, given `ips`, a
 * server's own certificate for those addresses, which its clients trust directly.
 */
export function makeCa(dir: string, name: string, ips: string[] = []): CertificateAuthority {
  const cert = path.join(dir, `${name}.pem`);
  const key = path.join(dir, `${name}.key`);
  openssl(
    'req',
    '-x509',
    '-newkey',
    'rsa:2048',
    '-nodes',
    '-days',
    '1',
    '-subj',
    `/CN=${name}`,
    ...(ips.length > 0 ? ['-addext', subjectAltName(ips)] : []),
    '-keyout',
    key,
    '-out',
    cert,
  );
  return { cert, key };
}

function subjectAltName(ips: string[]): string {
  return `subjectAltName=${ips.map((ip) => `IP:${ip}`).join(',')}`;
}

/** A server certificate for the IP addresses `ips`, signed by `ca`. */
export function makeServerCert(
  dir: string,
  name: string,
  ca: CertificateAuthority,
  ips: string[],
): { cert: string; key: string } {
  const cert = path.join(dir, `${name}.pem`);
  const key = path.join(dir, `${name}.key`);
  const request = path.join(dir, `${name}.csr`);
  const extensions = path.join(dir, `${name}.ext`);
  writeFileSync(extensions, `${subjectAltName(ips)}\n`);
  openssl('req', '-newkey', 'rsa:2048', '-nodes', '-subj', `/CN=${name}`, '-keyout', key, '-out', request);
  openssl(
    'x509',
    '-req',
    '-in',
    request,
    '-CA',
    ca.cert,
    '-CAkey',
    ca.key,
    '-set_serial',
    '1',
    '-days',
    '1',
    '-out',
    cert,
    '-extfile',
    extensions,
  );
  return { cert, key };
}
