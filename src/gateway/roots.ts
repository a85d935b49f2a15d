/**
 * Where the sidecar may load models, adapters and exams from. A gateway reachable beyond this
 * machine with no roots configured would let any caller make the sidecar read any file, so then
 * models and adapters are confined to ./models and exams to ./data/exams.
 */
import path from 'node:path';
import type { GolemConfig } from '../config';
import type { Logger } from '../log';

/** Whether a listen address (`host:port`, `[v6]:port`, `unix:...`) is reachable only from here. */
export function isLoopback(listen: string): boolean {
  if (listen.startsWith('unix:')) return true;
  const host = listen
    .slice(0, listen.lastIndexOf(':'))
    .replace(/^\[|\]$/g, '')
    .toLowerCase();
  return host === 'localhost' || host === '::1' || /^127(\.\d{1,3}){3}$/.test(host);
}

/**
 * The config the sidecar gets: roots made absolute (the two processes share a working directory,
 * but logs should show what is meant), and confined when listening beyond loopback with no roots
 * set.
 */
export function sidecarConfig(config: GolemConfig, listen: string, logger: Logger): GolemConfig {
  let { adapterRoots, modelRoots, examRoots } = config.security;
  const none = adapterRoots.length === 0 && modelRoots.length === 0 && examRoots.length === 0;
  if (!isLoopback(listen) && none) {
    const models = path.resolve('models');
    const exams = path.resolve('data/exams');
    adapterRoots = [models];
    modelRoots = [models];
    examRoots = [exams];
    logger.warn(
      'listening beyond loopback with no security.adapterRoots, modelRoots or examRoots: confining all three',
      { listen, root: models, examRoot: exams },
    );
  }
  const absolute = (roots: string[]): string[] => roots.map((root) => path.resolve(root));
  return {
    ...config,
    security: {
      ...config.security,
      adapterRoots: absolute(adapterRoots),
      modelRoots: absolute(modelRoots),
      examRoots: absolute(examRoots),
    },
  };
}
