/**
 * Makes a fake sidecar runnable as the gateway's `sidecar.python`: tests/support/fake-sidecar.ts,
 * transpiled into a temp dir, behind a small shell script that passes its mode along.
 */
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import ts from 'typescript';
import { PACKAGE_ROOT } from '../../src/config';

export type FakeSidecarMode = 'hang' | 'serve-once';

/** Writes the fake into `dir` and returns the command to use as `sidecar.python`. */
export function fakeSidecarPython(dir: string, mode: FakeSidecarMode): string {
  const source = readFileSync(path.join(__dirname, 'fake-sidecar.ts'), 'utf8');
  const { outputText } = ts.transpileModule(source, {
    compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022, esModuleInterop: true },
  });
  const script = path.join(dir, 'fake-sidecar.js');
  writeFileSync(script, outputText);
  const command = path.join(dir, `fake-python-${mode}`);
  const state = path.join(dir, `fake-${mode}.started`);
  writeFileSync(
    command,
    [
      '#!/bin/sh',
      `export NODE_PATH=${JSON.stringify(path.join(PACKAGE_ROOT, 'node_modules'))}`,
      `export FAKE_SIDECAR_PROTO_ROOT=${JSON.stringify(path.join(PACKAGE_ROOT, 'proto'))}`,
      `exec ${JSON.stringify(process.execPath)} ${JSON.stringify(script)} ${mode} ${JSON.stringify(state)} "$@"`,
      '',
    ].join('\n'),
  );
  chmodSync(command, 0o755);
  return command;
}
