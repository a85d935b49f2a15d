/**
 * The gateway's listening socket, with a handshake timeout. grpc-js 1.14 has none: its server
 * times out idle HTTP/2 sessions, old connections and unanswered keepalive pings, but a TCP
 * connection that never sends the HTTP/2 preface is never closed, and each one holds a socket.
 * So golem accepts connections itself (a plain net.Server) and hands each to grpc-js through its
 * public connection injector, closing those that have not sent the preface in time.
 */
import { createServer, type Server as NetServer, type Socket } from 'node:net';
import type { Server, ServerCredentials } from '@grpc/grpc-js';

/**
 * The client's half of the HTTP/2 handshake: the 24-byte preface ("PRI * HTTP/2.0...") and the
 * 9-byte header of the SETTINGS frame that must follow it. Over TLS the count includes the TLS
 * handshake, which Node itself bounds (tls handshakeTimeout, 120 s).
 */
export const HTTP2_PREFACE_BYTES = 24 + 9;

export interface Listener {
  /** The bound port (the real one when 0 was asked for; 0 for a Unix socket). */
  port: number;
  /** Stops accepting connections; those already open are grpc-js's to close. */
  close(): void;
}

/**
 * Listens on `address` (`host:port`, `[v6]:port` or `unix:/path`) for `server`, closing any
 * connection that has not sent the HTTP/2 preface within `handshakeTimeoutMs`.
 */
export function listenWithHandshakeTimeout(
  server: Server,
  address: string,
  credentials: ServerCredentials,
  handshakeTimeoutMs: number,
): Promise<Listener> {
  const injector = server.createConnectionInjector(credentials);
  const listener = createServer((socket) => {
    closeUnlessHandshakenIn(socket, handshakeTimeoutMs);
    injector.injectConnection(socket);
  });
  return new Promise((resolve, reject) => {
    const fail = (err: Error): void => reject(new Error(`cannot listen on ${address}: ${err.message}`));
    listener.once('error', fail);
    try {
      listener.listen(listenOptions(address), () => {
        listener.removeListener('error', fail);
        // Later errors (a failed accept) concern one connection, not the server.
        listener.on('error', () => undefined);
        resolve({ port: boundPort(listener), close: () => listener.close() });
      });
    } catch (err) {
      // A malformed address (a port that is not a number) throws rather than emitting 'error'.
      fail(err as Error);
    }
  });
}

function closeUnlessHandshakenIn(socket: Socket, timeoutMs: number): void {
  const timer = setTimeout(() => {
    // bytesRead counts what the socket received, whoever reads it (here nghttp2, in C++).
    if (socket.bytesRead < HTTP2_PREFACE_BYTES) socket.destroy();
  }, timeoutMs);
  timer.unref();
  socket.once('close', () => clearTimeout(timer));
}

function listenOptions(address: string): { path: string } | { host: string; port: number } {
  if (address.startsWith('unix:')) return { path: address.slice('unix:'.length) };
  const colon = address.lastIndexOf(':');
  const host = address.slice(0, colon).replace(/^\[|\]$/g, '');
  // One socket binds one address, and Node may resolve localhost to ::1 first, where clients of
  // the usual 127.0.0.1 would miss it: localhost means IPv4 loopback here.
  return { host: host.toLowerCase() === 'localhost' ? '127.0.0.1' : host, port: Number(address.slice(colon + 1)) };
}

function boundPort(listener: NetServer): number {
  const bound = listener.address();
  return typeof bound === 'object' && bound ? bound.port : 0;
}
