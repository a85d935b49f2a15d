/**
 * The seed profile end to end: `golem serve --config config/seed.json` on the embedded default
 * (SmolLM2's GGUF and the demo adapter) serves the seed's settings, 4-bit with float16 compute,
 * on this CPU-only machine; `golem exam` with the issue's 4-bit input answers " Fantasy".
 * Slow (the GGUF is dequantized, then quantized to 4 bit: about 20 s), and skipped where
 * `make models` has not built the default, unless GOLEM_REQUIRE_DEFAULT_MODEL=1 (make test).
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PACKAGE_ROOT } from '../src/config';
import { buildCli, golem, serve, stopDaemon, type Daemon } from './support/daemon';

const SEED = path.join(PACKAGE_ROOT, 'config', 'seed.json');
const seed = JSON.parse(readFileSync(SEED, 'utf8')) as { defaults: { modelName: string; adapterPath: string } };
const built =
  existsSync(path.join(PACKAGE_ROOT, seed.defaults.modelName)) &&
  existsSync(path.join(PACKAGE_ROOT, seed.defaults.adapterPath));
if (!built && process.env.GOLEM_REQUIRE_DEFAULT_MODEL === '1') {
  throw new Error('the embedded default is missing: run `make models`');
}
const describeBuilt = built ? describe : describe.skip;

describeBuilt('the seed profile (config/seed.json) on a CPU-only machine', () => {
  let dir: string;
  let daemon: Daemon | undefined;
  let address: string;

  beforeAll(async () => {
    buildCli();
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-seed-'));
    // The seed profile as shipped, on a free port (127.0.0.1:50051 may be taken by `make run`).
    const config = path.join(dir, 'seed.json');
    writeFileSync(config, JSON.stringify({ ...JSON.parse(readFileSync(SEED, 'utf8')), listen: '127.0.0.1:0' }));
    daemon = serve(config);
    address = await daemon.ready;
  }, 600000);

  afterAll(async () => {
    expect(await stopDaemon(daemon)).toBe(0);
    rmSync(dir, { recursive: true, force: true });
  });

  it('answers the 4-bit float16 exam with " Fantasy" and says it ran in 4 bit', async () => {
    const input = '{"quantization": {"loadIn4Bit": true, "bnb4BitComputeDtype": "float16"}}';
    const run = await golem(['exam', input, '--address', address]);
    expect(run.code).toBe(0);
    expect(run.json).toMatchObject({
      status: 'success',
      exitCode: 0,
      result: ' Fantasy',
      detail: {
        model: {
          device: 'cpu',
          dtype: 'float16',
          quantization: { loadIn4Bit: true, bnb4BitComputeDtype: 'float16', bnb4BitQuantType: 'fp4' },
        },
      },
    });
  });

  it("serves the seed's settings by default, and lists the base in 4 bit with its footprint", async () => {
    const run = await golem(['exam', '{}', '--address', address]);
    expect(run.json).toMatchObject({ exitCode: 0, result: ' Fantasy' });
    const list = await golem(['adapters', 'list', '--address', address]);
    const models = (
      list.json.detail as { models: { quantization: { loadIn4Bit: boolean }; memoryFootprintBytes: number }[] }
    ).models;
    expect(models).toHaveLength(1);
    expect(models[0].quantization.loadIn4Bit).toBe(true);
    // SmolLM2-135M: about 540 MB in float32; in 4 bit with float16 compute about 120 MB.
    expect(models[0].memoryFootprintBytes).toBeGreaterThan(50e6);
    expect(models[0].memoryFootprintBytes).toBeLessThan(250e6);
  });
});
