import { DisagreementCollector } from '../../src/cli/disagreements';
import { MAX_DISAGREEMENTS } from '../../src/cli/report';
import { FinishReason, type ExamPlan, type ItemResult } from '../../src/gen/golem/exam/v1/exam';

const ADAPTER = '/adapters/genres';

function plan(models: string[]): ExamPlan {
  return { examName: 'e', items: 0, models, scorers: ['exact_match', 'contains'], results: 0, resumed: 0 };
}

function result(itemId: string, model: string, exactMatch: number, contains = 0): ItemResult {
  return {
    itemId,
    model,
    key: `${itemId}/${model}`,
    answer: '',
    answerTokens: 1,
    finishReason: FinishReason.FINISH_REASON_LENGTH,
    scores: { exact_match: exactMatch, contains },
    resumed: false,
  };
}

describe('DisagreementCollector', () => {
  it("keeps the items where an adapter's first score differs from the base's, in stream order", () => {
    const collector = new DisagreementCollector();
    collector.start(plan(['__base__', ADAPTER, 'other']));
    const stream = [
      result('q1', '__base__', 0),
      result('q1', ADAPTER, 1),
      result('q1', 'other', 0, 1), // Only the second scorer differs: no disagreement.
      result('q2', '__base__', 1),
      result('q2', ADAPTER, 1),
      result('q2', 'other', 0),
    ];
    for (const r of stream) collector.add(r);
    const { disagreements, disagreementsOmitted } = collector.result();
    expect(
      disagreements.map((d) => [d.itemId, d.model, d.base.scores.exact_match, d.adapter.scores.exact_match]),
    ).toEqual([
      ['q1', ADAPTER, 0, 1],
      ['q2', 'other', 1, 0],
    ]);
    expect(disagreementsOmitted).toBe(0);
  });

  it('keeps MAX_DISAGREEMENTS rows and counts the rest', () => {
    const collector = new DisagreementCollector();
    collector.start(plan(['__base__', ADAPTER]));
    const items = MAX_DISAGREEMENTS + 7;
    for (let i = 0; i < items; i++) {
      collector.add(result(`q${i}`, '__base__', 0));
      collector.add(result(`q${i}`, ADAPTER, 1));
    }
    const { disagreements, disagreementsOmitted } = collector.result();
    expect(disagreements).toHaveLength(MAX_DISAGREEMENTS);
    expect(disagreements[MAX_DISAGREEMENTS - 1].itemId).toBe(`q${MAX_DISAGREEMENTS - 1}`);
    expect(disagreementsOmitted).toBe(7);
  });

  it('finds none when the base was not graded', () => {
    const collector = new DisagreementCollector();
    collector.start(plan([ADAPTER, 'other']));
    collector.add(result('q1', ADAPTER, 1));
    collector.add(result('q1', 'other', 0));
    expect(collector.result()).toEqual({ disagreements: [], disagreementsOmitted: 0 });
  });
});
