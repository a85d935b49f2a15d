/**
 * The sidecar suite's fixture builders (inference_py/tests/*.py), run from this suite so that both
 * suites throw the same files at golem: `python -m tests.<module> ARGS...` prints a JSON object of
 * paths by name.
 */
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../src/config';
import { PYTHON } from './tiny-models';

/** Runs the builder and returns a lookup that fails loudly on a name it did not build. */
export function pythonFixtures(module: string, args: string[]): (key: string) => string {
  const printed = execFileSync(PYTHON, ['-m', `tests.${module}`, ...args], {
    // From inference_py/, `tests` is the sidecar suite's package.
    cwd: path.join(PACKAGE_ROOT, 'inference_py'),
    env: { ...process.env, HF_HUB_OFFLINE: '1' },
    stdio: ['ignore', 'pipe', 'ignore'],
  }).toString();
  const built = JSON.parse(printed) as Record<string, string | undefined>;
  return (key: string): string => {
    const found = built[key];
    if (found === undefined) throw new Error(`${module}.py built no "${key}"`);
    return found;
  };
}
