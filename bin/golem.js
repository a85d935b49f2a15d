#!/usr/bin/env node
'use strict';
// The compiled CLI lives in dist/ (`npm run build`, or `make setup`).
const { main } = require('../dist/cli/main.js');

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`golem: error: ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
  },
);
