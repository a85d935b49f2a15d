/** The environment a spawned sidecar gets: its own checkout's code, no token, offline. */
import path from 'node:path';
import { loadConfig, PACKAGE_ROOT } from '../../src/config';
import { sidecarEnvironment } from '../../src/sidecar/process';

describe('sidecarEnvironment', () => {
  const config = loadConfig({ env: {} });

  it("puts this checkout's inference_py first on PYTHONPATH, keeping the caller's after it", () => {
    const own = path.join(PACKAGE_ROOT, 'inference_py');
    expect(sidecarEnvironment(config, {}).PYTHONPATH).toBe(own);
    expect(sidecarEnvironment(config, { PYTHONPATH: '/elsewhere' }).PYTHONPATH).toBe(
      `${own}${path.delimiter}/elsewhere`,
    );
  });

  it('drops the bearer token and keeps the sidecar offline', () => {
    const env = sidecarEnvironment(config, { GOLEM_AUTH_TOKEN: 'secret', HOME: '/home/x' });
    expect(env.GOLEM_AUTH_TOKEN).toBeUndefined();
    expect(env).toMatchObject({ HOME: '/home/x', HF_HUB_OFFLINE: '1', TRANSFORMERS_OFFLINE: '1' });
  });
});
