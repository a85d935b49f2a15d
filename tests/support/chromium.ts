/**
 * Opens an HTML file in a real headless Chromium (Debian's, which `make test-js` installs) and
 * reads back what a reader sees: the report's tests and the CLI's end-to-end test use it.
 */
import { pathToFileURL } from 'node:url';
import { chromium, type Browser, type Locator, type Page } from 'playwright-core';

/** Debian's chromium package; playwright-core ships no browser of its own. */
export const CHROMIUM = '/usr/bin/chromium';

// No sandbox (tests may run as root in a container), no GPU, and none of Chromium's own traffic
// (updates, sync, QUIC probes): the page is a local file and needs nothing else.
const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

export interface OpenedPage {
  browser: Browser;
  page: Page;
  /** Every URL the page requested other than the file itself. */
  requests: string[];
}

/** Launches Chromium (a fresh, empty profile) and opens `htmlPath`; close `browser` when done. */
export async function openInChromium(htmlPath: string): Promise<OpenedPage> {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const url = pathToFileURL(htmlPath).href;
  const requests: string[] = [];
  page.on('request', (request) => {
    if (request.url() !== url) requests.push(request.url());
  });
  await page.goto(url);
  return { browser, page, requests };
}

/** One cell of the report's summary table as shown: `text` is the mean, `n` its item count. */
export interface SummaryCell {
  model: string;
  scorer: string;
  text: string;
  n: string;
}

/** The summary table's cells, row by row, with their visible text. */
export async function summaryCells(page: Page): Promise<SummaryCell[]> {
  const cells: SummaryCell[] = [];
  for (const cell of await page.locator('#summary td[data-model]').all()) {
    cells.push({
      model: (await cell.getAttribute('data-model')) ?? '',
      scorer: (await cell.getAttribute('data-scorer')) ?? '',
      text: await cell.locator('.mean').innerText(),
      n: await cell.locator('.n').innerText(),
    });
  }
  return cells;
}

/** Where `locator` is drawn, in page pixels; fails when it is not drawn at all. */
export async function boxOf(locator: Locator): Promise<{ x: number; y: number; width: number; height: number }> {
  const box = await locator.boundingBox();
  if (box === null) throw new Error(`${locator.toString()} is not drawn`);
  return box;
}
