import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { Browser, Page } from 'playwright-core';
import { disagreement, MAX_DISAGREEMENTS, renderReport, type GradeReport } from '../src/cli/report';
import { FinishReason, type ExamSummary, type ItemResult } from '../src/gen/golem/exam/v1/exam';
import { boxOf, openInChromium, summaryCells } from './support/chromium';

const HOSTILE_ANSWER = '<script>alert(1)</script></table><b>bold</b>';
const HOSTILE_ID = 'q"7\'><img src=x onerror=alert(2)>';

// What GradeExam sends for 25 genre questions, the bare base and one adapter, two scorers.
const summary: ExamSummary = {
  examName: 'genres',
  examVersion: '1.2',
  examHash: 'sha256:9c1e4a7f03b2d5e8a6c4f1b0e9d7c5a3b1f2e4d6c8a0b9e7f5d3c1a2b4e6f8d0',
  items: 25,
  models: [
    {
      model: '__base__',
      adapterHash: '',
      scores: [
        { scorer: 'exact_match', mean: 0.44, n: 25 },
        { scorer: 'mean_logprob', mean: -2.317481234, n: 25 },
      ],
    },
    {
      model: 'genres',
      adapterHash: 'sha256:4f2a',
      scores: [
        { scorer: 'exact_match', mean: 0.84, n: 25 },
        { scorer: 'mean_logprob', mean: -0.812345678, n: 25 },
      ],
    },
  ],
  deltas: [
    {
      model: 'genres',
      deltas: [
        { scorer: 'exact_match', delta: 0.4, n: 25, better: 11, worse: 1, same: 13 },
        { scorer: 'mean_logprob', delta: 1.505135556, n: 25, better: 23, worse: 2, same: 0 },
      ],
    },
  ],
  graded: 46,
  resumed: 4,
  model: {
    modelName: 'models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf',
    device: 'cpu',
    dtype: 'float32',
    quantization: { loadIn4bit: false, effectiveComputeDtype: '' },
  },
};

function result(itemId: string, model: string, answer: string, exact: number, logprob: number): ItemResult {
  return {
    itemId,
    model,
    key: `${itemId}/${model}`,
    answer,
    answerTokens: 3,
    finishReason: FinishReason.FINISH_REASON_EOS,
    scores: { exact_match: exact, mean_logprob: logprob },
    resumed: false,
  };
}

function report(overrides: Partial<GradeReport> = {}): GradeReport {
  const base = result(HOSTILE_ID, '__base__', 'fantasy', 0, -2.9);
  const adapter = result(HOSTILE_ID, 'genres', HOSTILE_ANSWER, 1, -0.4);
  return {
    examPath: 'exams/genres.jsonl',
    summary,
    disagreements: [{ itemId: HOSTILE_ID, model: 'genres', base, adapter }],
    disagreementsOmitted: 0,
    ...overrides,
  };
}

describe('renderReport', () => {
  it('shows each model × scorer mean with 3 decimals, n, and the exact value in data-mean', () => {
    const html = renderReport(report());
    expect(html).toContain(
      '<td class="num" data-model="__base__" data-scorer="mean_logprob" data-mean="-2.317481234"><span class="mean">-2.317</span> <small class="n">n=25</small></td>',
    );
    expect(html).toContain(
      'data-model="genres" data-scorer="exact_match" data-mean="0.84"><span class="mean">0.840</span>',
    );
  });

  it('heads the page with the exam, its short hash, the counts and the base', () => {
    const html = renderReport(report());
    expect(html).toContain('<title>golem grade: genres 1.2</title>');
    expect(html).toContain('>9c1e4a7f03b2</code>: 25 items; 46 results graded, 4 resumed.');
    expect(html).toContain(
      '<code>models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf</code> on cpu, dtype float32, 4-bit: no.',
    );
  });

  it('signs deltas and colours them by direction', () => {
    const html = renderReport(report());
    expect(html).toMatch(
      /class="num better" data-model="genres" data-scorer="mean_logprob" data-delta="1.505135556">\+1.505</,
    );
    const worse = { ...summary.deltas[0].deltas[0], delta: -0.0402 };
    const html2 = renderReport(report({ summary: { ...summary, deltas: [{ model: 'genres', deltas: [worse] }] } }));
    expect(html2).toMatch(/class="num worse"[^>]*>-0.040</);
  });

  it('renders hostile answers and item ids as text, never as markup', () => {
    const html = renderReport(report());
    expect(html).toContain('&lt;script&gt;alert(1)&lt;/script&gt;&lt;/table&gt;&lt;b&gt;bold&lt;/b&gt;');
    expect(html).toContain('q&quot;7&#39;&gt;&lt;img src=x onerror=alert(2)&gt;');
    expect(html).not.toMatch(/<script|<img|<b>/i);
    // Three tables (summary, deltas, disagreements): the answer's </table> closed none of them.
    expect(html.match(/<\/table>/g)).toHaveLength(3);
  });

  it('loads nothing from elsewhere and needs no script', () => {
    // Inside tags only: the hostile item id carries " src=x" as escaped text.
    expect(renderReport(report())).not.toMatch(/<[^>]*\s(src|href)=|@import|url\(/i);
  });

  it('says how many disagreements were left out', () => {
    const html = renderReport(report({ disagreementsOmitted: 17 }));
    expect(html).toContain(`17 more disagreements omitted: a report keeps the first ${MAX_DISAGREEMENTS}.`);
    expect(renderReport(report())).not.toContain('disagreements-omitted');
  });

  it('says so when there are no disagreements, and draws no empty table', () => {
    const html = renderReport(report({ disagreements: [] }));
    expect(html).toContain('No item where an adapter and the base disagree.');
    expect(html).not.toContain('id="disagreements"');
  });

  it('says there are no deltas and nothing to disagree with when the base was not graded', () => {
    const adapterOnly = { ...summary, models: summary.models.slice(1), deltas: [] };
    const html = renderReport(report({ summary: adapterOnly, disagreements: [] }));
    expect(html).toContain('The bare base was not graded, so there are no deltas.');
    expect(html).toContain('The bare base was not graded, so there is nothing to disagree with.');
  });
});

describe('disagreement', () => {
  it('is decided by the primary scorer, not by the answers’ text', () => {
    const base = result('q1', '__base__', 'Fantasy.', 1, -1.2);
    expect(disagreement(base, result('q1', 'genres', 'fantasy', 1, -0.3), 'exact_match')).toBe(false);
    expect(disagreement(base, result('q1', 'genres', 'Fantasy.', 0, -1.2), 'exact_match')).toBe(true);
    expect(disagreement(base, result('q1', 'genres', 'fantasy', 1, -0.3), 'mean_logprob')).toBe(true);
  });
});

describe('the report in Chromium', () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'golem-report-'));
  const htmlPath = path.join(dir, 'report.html');
  let browser: Browser | undefined;
  let page: Page;
  let requests: string[];

  beforeAll(async () => {
    writeFileSync(htmlPath, renderReport(report()));
    ({ browser, page, requests } = await openInChromium(htmlPath));
  }, 60_000);

  afterAll(async () => {
    await browser?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('shows the summary table in view, with each mean as formatted from the summary', async () => {
    const screenshot = path.join(dir, 'report.png');
    await page.screenshot({ path: screenshot, fullPage: true });
    expect(statSync(screenshot).size).toBeGreaterThan(1000);
    expect(readFileSync(screenshot).subarray(1, 4).toString()).toBe('PNG');

    const table = page.locator('#summary');
    expect(await table.isVisible()).toBe(true);
    // The page's viewport is fixed (openInChromium), so viewportSize() is never null here.
    const box = await boxOf(table);
    const viewport = page.viewportSize() ?? { width: 0, height: 0 };
    expect(box.x).toBeGreaterThanOrEqual(0);
    expect(box.y).toBeGreaterThanOrEqual(0);
    expect(box.x + box.width).toBeLessThanOrEqual(viewport.width);
    expect(box.y + box.height).toBeLessThanOrEqual(viewport.height);

    const expected = summary.models.flatMap((m) =>
      m.scores.map((s) => ({ model: m.model, scorer: s.scorer, text: s.mean.toFixed(3), n: `n=${s.n}` })),
    );
    expect(await summaryCells(page)).toEqual(expected);
    expect(requests).toEqual([]);
  }, 60_000);

  it('draws one chart per scorer, negative scores downwards from the zero line', async () => {
    for (const scorer of ['exact_match', 'mean_logprob']) {
      expect(await page.locator(`svg.chart[data-scorer="${scorer}"]`).isVisible()).toBe(true);
    }
    const bars = async (scorer: string) =>
      Promise.all((await page.locator(`svg.chart[data-scorer="${scorer}"] rect`).all()).map(boxOf));
    const [baseHit, adapterHit] = await bars('exact_match');
    // Positive: a shared bottom edge (the zero line), the adapter's 0.84 taller than the base's 0.44.
    expect(baseHit.y + baseHit.height).toBeCloseTo(adapterHit.y + adapterHit.height, 0);
    expect(adapterHit.height).toBeGreaterThan(baseHit.height);
    const [baseLogprob, adapterLogprob] = await bars('mean_logprob');
    // Negative: a shared top edge, the base's -2.32 reaching further down than the adapter's -0.81.
    expect(baseLogprob.y).toBeCloseTo(adapterLogprob.y, 0);
    expect(baseLogprob.height).toBeGreaterThan(adapterLogprob.height);
  }, 60_000);

  it('shows a hostile answer as its text and runs no script', async () => {
    expect(await page.locator('#disagreements td.answer').nth(1).innerText()).toBe(HOSTILE_ANSWER);
    expect(await page.locator('#disagreements td').first().innerText()).toBe(HOSTILE_ID);
    expect(await page.locator('script, img').count()).toBe(0);
  }, 60_000);
});
