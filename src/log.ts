/**
 * Logging: winston JSON lines on stderr, so that stdout stays free for the CLI's one JSON answer.
 * A log line that cannot be written (disk full, reader gone) is dropped: it never ends a call,
 * and never the process.
 */
import winston from 'winston';

export type LogLevel = 'error' | 'warn' | 'info' | 'debug';
export type Logger = winston.Logger;

const stampTime = winston.format((info) => {
  info.time = new Date().toISOString();
  return info;
});

let stderrGuarded = false;

/**
 * An unhandled 'error' on process.stderr (EPIPE, ENOSPC) is an uncaught exception. Every writer
 * shares the one stream (our logs, the sidecar's forwarded output, the CLI's messages), so one
 * listener covers them all; the stream itself stays usable for the next write.
 */
export function keepStderrFromFailing(): void {
  if (stderrGuarded) return;
  stderrGuarded = true;
  process.stderr.on('error', () => undefined);
}

/** Makes the process's logger; every line is one JSON object with a timestamp and a level. */
export function createLogger(level: LogLevel): Logger {
  keepStderrFromFailing();
  const logger = winston.createLogger({
    level,
    // `time` as the sidecar writes it, so both processes' lines sort and filter alike.
    format: winston.format.combine(stampTime(), winston.format.json()),
    defaultMeta: { component: 'gateway' },
    // Straight to the stderr stream, every level: no console in between to redirect it.
    transports: [new winston.transports.Stream({ stream: process.stderr })],
  });
  // winston passes its transports' errors on as its own 'error': unheard, that would throw.
  logger.on('error', () => undefined);
  return logger;
}
