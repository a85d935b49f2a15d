/**
 * Tiny, real, offline models for the tests, made by the sidecar's own fixture script
 * (inference_py/tests/tiny_models.py). Built once per version of that script and kept in the
 * temp dir, since building costs seconds and every suite wants the same ones.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PACKAGE_ROOT, loadConfig, type GolemConfig } from '../../src/config';

export interface TinyModels {
  model: string;
  adapter: string;
  adapter_b: string;
}

const SCRIPT = path.join(PACKAGE_ROOT, 'inference_py', 'tests', 'tiny_models.py');
export const PYTHON = path.join(PACKAGE_ROOT, '.venv', 'bin', 'python');

/** Builds the tiny models, or finds the ones already built by this version of the script. */
export function tinyModels(): TinyModels {
  const version = createHash('sha256').update(readFileSync(SCRIPT)).digest('hex').slice(0, 12);
  const dir = path.join(os.tmpdir(), `golem-tiny-models-${version}`);
  const index = path.join(dir, 'paths.json');
  if (!existsSync(index)) {
    // Build beside the final place and rename, so a half-built folder is never found.
    const building = mkdtempSync(`${dir}-building-`);
    const printed = execFileSync(PYTHON, [SCRIPT, path.join(building, 'out')], {
      env: { ...process.env, HF_HUB_OFFLINE: '1' },
      stdio: ['ignore', 'pipe', 'ignore'],
    }).toString();
    const built = JSON.parse(printed) as TinyModels;
    // Stored relative to the folder, which is renamed once built.
    const relative: TinyModels = {
      model: path.relative(building, built.model),
      adapter: path.relative(building, built.adapter),
      adapter_b: path.relative(building, built.adapter_b),
    };
    writeFileSync(path.join(building, 'paths.json'), JSON.stringify(relative));
    rmSync(dir, { recursive: true, force: true });
    renameSync(building, dir);
  }
  const relative = JSON.parse(readFileSync(index, 'utf8')) as TinyModels;
  return {
    model: path.join(dir, relative.model),
    adapter: path.join(dir, relative.adapter),
    adapter_b: path.join(dir, relative.adapter_b),
  };
}

/** The embedded config, pointed at the tiny models on the CPU, quiet enough for test output. */
export function tinyConfig(models: TinyModels): GolemConfig {
  const config = loadConfig({ file: path.join(PACKAGE_ROOT, 'config', 'golem.json'), env: {} });
  return {
    ...config,
    listen: '127.0.0.1:0',
    logLevel: 'warn',
    sidecar: { ...config.sidecar, address: '', python: PYTHON, startTimeoutMs: 120000 },
    defaults: {
      ...config.defaults,
      modelName: models.model,
      adapterPath: models.adapter,
      device: 'cpu',
      maxNewTokens: 4,
      quantization: 'auto',
    },
  };
}
