/** Jest runs the TypeScript tests through ts-jest; type errors are `npm run typecheck`'s job. */
/** @type {import('jest').Config} */
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/tests'],
  testMatch: ['**/*.test.ts'],
  transform: { '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.json' }] },
  // The sidecar loads torch on start-up: tens of seconds on a small CPU machine.
  testTimeout: 180000,
};
