/**
 * grpcurl against a real `golem serve` on the tiny models: reflection serves the google.rpc
 * descriptors too, so grpcurl shows a failed call's ErrorInfo and BadRequest decoded, not as bytes.
 * The binary comes from `make .tools/grpcurl` (part of `make test`).
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PACKAGE_ROOT } from '../src/config';
import { buildCli, serve, stopDaemon, type Daemon } from './support/daemon';
import { tinyConfig, tinyModels } from './support/tiny-models';

const GRPCURL = path.join(PACKAGE_ROOT, '.tools', 'grpcurl');

interface GrpcurlRun {
  code: number;
  output: string;
}

function grpcurl(args: string[]): Promise<GrpcurlRun> {
  return new Promise((resolve) => {
    execFile(GRPCURL, args, { timeout: 60000 }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === 'number' ? error.code : -1) : 0;
      resolve({ code, output: `${stdout}${stderr}` });
    });
  });
}

/** The details grpcurl prints under "Details:", one JSON object a line (`1)\t{...}`). */
function printedDetails(output: string): unknown[] {
  return output
    .split('\n')
    .map((line) => /^\s*\d+\)\s+(\{.*\})\s*$/.exec(line)?.[1])
    .filter((json): json is string => json !== undefined)
    .map((json) => JSON.parse(json) as unknown);
}

describe('grpcurl through the gateway reflection', () => {
  let dir: string;
  let daemon: Daemon | undefined;
  let address: string;

  beforeAll(async () => {
    if (!existsSync(GRPCURL)) throw new Error(`${GRPCURL} is missing: run \`make .tools/grpcurl\``);
    buildCli();
    const models = tinyModels();
    dir = mkdtempSync(path.join(os.tmpdir(), 'golem-grpcurl-'));
    const file = path.join(dir, 'golem.json');
    // Info level: serve() learns the address from the "gateway ready" line.
    writeFileSync(file, JSON.stringify({ ...tinyConfig(models), logLevel: 'info' }));
    daemon = serve(file);
    address = await daemon.ready;
  });

  afterAll(async () => {
    await stopDaemon(daemon);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('shows a failed call with its ErrorInfo reason and BadRequest field decoded', async () => {
    const missing = path.join(dir, 'no-such-adapter');
    const run = await grpcurl([
      '-plaintext',
      '-d',
      JSON.stringify({ adapter_path: missing, max_new_tokens: 1 }),
      address,
      'golem.exam.v1.ExamService/TakeExam',
    ]);
    // grpcurl exits 64 + the status code: NOT_FOUND is 5.
    expect(run.code).toBe(64 + 5);
    expect(run.output).toContain('Code: NotFound');
    const details = printedDetails(run.output);
    expect(details).toEqual([
      { '@type': 'type.googleapis.com/google.rpc.ErrorInfo', domain: 'golem.dev', reason: 'ADAPTER_NOT_FOUND' },
      {
        '@type': 'type.googleapis.com/google.rpc.BadRequest',
        fieldViolations: [expect.objectContaining({ field: 'adapter_path' })],
      },
    ]);
  });

  it('describes the error detail types and the contract', async () => {
    const errorInfo = await grpcurl(['-plaintext', address, 'describe', 'google.rpc.ErrorInfo']);
    expect(errorInfo.code).toBe(0);
    expect(errorInfo.output).toContain('string reason = 1;');
    const listed = await grpcurl(['-plaintext', address, 'list']);
    expect(listed.code).toBe(0);
    expect(listed.output.split('\n')).toEqual(
      expect.arrayContaining(['golem.exam.v1.ExamService', 'grpc.health.v1.Health']),
    );
  });
});
