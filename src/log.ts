/**
 * Logging: winston JSON lines on stderr, so that stdout stays free for the CLI's one JSON answer.
 */
import winston from 'winston';

export type LogLevel = 'error' | 'warn' | 'info' | 'debug';
export type Logger = winston.Logger;

const stampTime = winston.format((info) => {
  info.time = new Date().toISOString();
  return info;
});

/** Makes the process's logger; every line is one JSON object with a timestamp and a level. */
export function createLogger(level: LogLevel): Logger {
  return winston.createLogger({
    level,
    // `time` as the sidecar writes it, so both processes' lines sort and filter alike.
    format: winston.format.combine(stampTime(), winston.format.json()),
    defaultMeta: { component: 'gateway' },
    // Straight to the stderr stream, every level: no console in between to redirect it.
    transports: [new winston.transports.Stream({ stream: process.stderr })],
  });
}
