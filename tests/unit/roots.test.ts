import path from 'node:path';
import { loadConfig } from '../../src/config';
import { isLoopback, sidecarConfig } from '../../src/gateway/roots';
import { captureLogs } from '../support/logs';

describe('isLoopback', () => {
  it.each(['127.0.0.1:50051', '127.1.2.3:0', 'localhost:50051', '[::1]:50051', 'unix:/tmp/golem.sock'])(
    '%s is loopback',
    (listen) => expect(isLoopback(listen)).toBe(true),
  );
  it.each(['0.0.0.0:50051', '[::]:50051', '10.0.0.5:50051', 'golem.example.com:443', '128.0.0.1:1'])(
    '%s is not',
    (listen) => expect(isLoopback(listen)).toBe(false),
  );
});

describe('sidecarConfig', () => {
  const config = loadConfig({ env: {} });
  const withRoots = (adapterRoots: string[], modelRoots: string[]) => ({
    ...config,
    security: { ...config.security, adapterRoots, modelRoots },
  });

  it('leaves empty roots alone on loopback', () => {
    const { logger, lines } = captureLogs();
    expect(sidecarConfig(config, '127.0.0.1:50051', logger).security).toMatchObject({
      adapterRoots: [],
      modelRoots: [],
      examRoots: [],
    });
    expect(lines()).toEqual([]);
  });

  it('confines models and adapters to ./models and exams to ./data/exams beyond loopback when no root is set, and says so', () => {
    const { logger, lines } = captureLogs();
    const models = path.resolve('models');
    expect(sidecarConfig(config, '0.0.0.0:50051', logger).security).toMatchObject({
      adapterRoots: [models],
      modelRoots: [models],
      examRoots: [path.resolve('data/exams')],
    });
    expect(lines()).toEqual([expect.objectContaining({ level: 'warn', root: models, listen: '0.0.0.0:50051' })]);
  });

  it('keeps configured roots beyond loopback, made absolute', () => {
    const { logger } = captureLogs();
    const security = sidecarConfig(withRoots(['adapters'], []), '0.0.0.0:50051', logger).security;
    expect(security).toMatchObject({ adapterRoots: [path.resolve('adapters')], modelRoots: [], examRoots: [] });
  });

  it('does not change the config it was given', () => {
    const { logger } = captureLogs();
    sidecarConfig(config, '0.0.0.0:50051', logger);
    expect(config.security.adapterRoots).toEqual([]);
  });
});
