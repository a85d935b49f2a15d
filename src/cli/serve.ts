/**
 * `golem serve`: the gateway and its sidecar until SIGINT or SIGTERM, then a clean stop.
 */
import { loadConfig } from '../config';
import { startGateway } from '../gateway/server';
import { createLogger } from '../log';

/** Serves until a signal (exit 0) or until the sidecar dies under us (exit 1). */
export async function runServe(configFile: string | undefined): Promise<number> {
  const config = loadConfig({ file: configFile });
  const logger = createLogger(config.logLevel);
  let sidecarDied: (code: number) => void = () => undefined;
  const stopped = new Promise<number>((resolve) => {
    sidecarDied = resolve;
    for (const signal of ['SIGINT', 'SIGTERM'] as const) {
      process.once(signal, () => {
        logger.info('shutting down', { signal });
        resolve(0);
      });
    }
  });
  const gateway = await Promise.race([
    startGateway(config, { logger, onSidecarExit: () => sidecarDied(1) }),
    // A signal while the model loads: exit now; the sidecar is killed as this process exits.
    stopped.then(() => undefined),
  ]);
  if (!gateway) return 0;
  const code = await stopped;
  await gateway.close();
  return code;
}
