/**
 * The short soak: `scripts/soak.mjs --requests 300` (mixed good and bad requests at concurrency
 * 64 through a real `golem serve`, the sidecar SIGKILLed in the middle). RSS growth is not
 * checked here: 300 requests are too few to judge it; `npm run soak` (2000) reports it.
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PACKAGE_ROOT } from '../src/config';
import { buildCli } from './support/daemon';
import { tinyConfig, tinyModels } from './support/tiny-models';

interface SoakReport {
  ok: boolean;
  requests: number;
  undocumented: unknown[];
  checks: Record<string, boolean>;
  outcomes: Record<string, Record<string, number>>;
}

describe('soak, short', () => {
  let dir: string;
  beforeAll(() => {
    buildCli();
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-soak-test-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('300 mixed requests with a sidecar SIGKILL: every one documented, serving at the end', async () => {
    const configFile = path.join(dir, 'golem.json');
    writeFileSync(configFile, JSON.stringify(tinyConfig(tinyModels())));
    const stdout = await new Promise<string>((resolve) => {
      execFile(
        'node',
        [path.join(PACKAGE_ROOT, 'scripts', 'soak.mjs'), '--requests', '300', '--config', configFile],
        { cwd: PACKAGE_ROOT, env: { ...process.env, HF_HUB_OFFLINE: '1' }, maxBuffer: 64 << 20 },
        (_error, out) => resolve(out),
      );
    });
    const report = JSON.parse(stdout) as SoakReport;
    expect(report.undocumented).toEqual([]);
    expect(report.checks).toMatchObject({
      allDocumented: true,
      sidecarRestarted: true,
      servesAtEnd: true,
      exitedCleanly: true,
    });
    expect(report.ok).toBe(true);
    const answered = Object.values(report.outcomes).flatMap((counts) => Object.values(counts));
    expect(answered.reduce((a, b) => a + b, 0)).toBe(300);
  });
});
