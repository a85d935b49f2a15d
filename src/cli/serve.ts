/**
 * `golem serve`: the gateway and its sidecar until SIGINT or SIGTERM, then a graceful stop:
 * health NOT_SERVING, no new calls, calls in flight finish within `limits.shutdownGraceMs`.
 */
import { loadConfig, type GolemConfig } from '../config';
import { startGateway } from '../gateway/server';
import { createLogger, type Logger } from '../log';
import type { Tracing } from '../tracing';
import { ExitCode } from './exit-codes';

/** Serves until a signal (exit 0) or until the sidecar cannot be kept alive (exit 5). */
export async function runServe(configFile: string | undefined): Promise<number> {
  const config = loadConfig({ file: configFile });
  const logger = createLogger(config.logLevel);
  const tracing = await startTracingIfOn(config, logger);
  try {
    return await serveUntilStopped(config, logger);
  } finally {
    await tracing?.shutdown();
  }
}

// Imported only when on: tracing off loads no OpenTelemetry module at all.
async function startTracingIfOn(config: GolemConfig, logger: Logger): Promise<Tracing | undefined> {
  if (!config.tracing.otlpEndpoint) return undefined;
  const { startTracing } = await import('../tracing');
  logger.info('tracing on', { otlp_endpoint: config.tracing.otlpEndpoint });
  return startTracing(config.tracing);
}

async function serveUntilStopped(config: GolemConfig, logger: Logger): Promise<number> {
  let finish: (code: number) => void = () => undefined;
  const finished = new Promise<number>((resolve) => {
    finish = resolve;
  });
  let signals = 0;
  const onSignal = (signal: NodeJS.Signals): void => {
    signals += 1;
    if (signals === 1) {
      logger.info('shutting down', { signal });
      finish(ExitCode.SUCCESS);
      return;
    }
    // A second signal means "now": exit; the exit handler SIGKILLs the sidecar and removes its
    // socket folder (sidecar/process.ts).
    logger.warn('second signal: stopping without waiting', { signal });
    process.exit(ExitCode.FAILURE);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const onSidecarFailed = (reason: string): void => {
    process.stderr.write(`golem: error: ${reason}\n`);
    finish(ExitCode.UNAVAILABLE);
  };
  const gateway = await Promise.race([
    startGateway(config, { logger, onSidecarFailed }),
    // A signal while the model loads: exit now; the sidecar is killed, and its socket folder
    // removed, as this process exits.
    finished.then(() => undefined),
  ]);
  if (!gateway) return ExitCode.SUCCESS;
  const code = await finished;
  await gateway.close();
  return code;
}
