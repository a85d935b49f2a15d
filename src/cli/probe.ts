/**
 * Whether a daemon listens at an address, to decide between calling it and starting one for the
 * call. For `host:port` this is a plain TCP connect: something that accepts connections is the
 * daemon to talk to, even if the call then fails (say, TLS without --tls-ca), and is never
 * silently replaced by a private one. Other address forms (`unix:`) get a gRPC connect.
 */
import net from 'node:net';
import { connectivityState, credentials } from '@grpc/grpc-js';
import { ExamServiceClient } from '../gen/golem/exam/v1/exam';

const PROBE_TIMEOUT_MS = 3000;

export async function isListening(address: string): Promise<boolean> {
  const match = /^(?:dns:(?:\/\/\/)?|ipv4:|ipv6:)?\[?([^\]]*?)\]?:(\d+)$/.exec(address);
  return match ? tcpAccepts(match[1], Number(match[2])) : grpcConnects(address);
}

function tcpAccepts(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port, timeout: PROBE_TIMEOUT_MS });
    const done = (listening: boolean): void => {
      socket.destroy();
      resolve(listening);
    };
    socket.once('connect', () => done(true));
    socket.once('timeout', () => done(false));
    socket.once('error', () => done(false));
  });
}

async function grpcConnects(address: string): Promise<boolean> {
  const client = new ExamServiceClient(address, credentials.createInsecure());
  const channel = client.getChannel();
  const deadline = Date.now() + PROBE_TIMEOUT_MS;
  try {
    let state = channel.getConnectivityState(true);
    while (state !== connectivityState.READY) {
      if (state === connectivityState.TRANSIENT_FAILURE || state === connectivityState.SHUTDOWN) return false;
      const changed = await new Promise<boolean>((resolve) => {
        channel.watchConnectivityState(state, deadline, (err) => resolve(!err));
      });
      if (!changed) return false;
      state = channel.getConnectivityState(true);
    }
    return true;
  } finally {
    client.close();
  }
}
