import fc from 'fast-check';
import { TakeExamRequest } from '../../src/gen/golem/exam/v1/exam';
import { COMPUTE_DTYPES, validateTakeExam } from '../../src/gateway/validation';

const limits = { maxNewTokensCap: 64 };

function request(fields: Partial<TakeExamRequest>): TakeExamRequest {
  return TakeExamRequest.fromPartial(fields);
}

function fieldsOf(fields: Partial<TakeExamRequest>): string[] {
  return validateTakeExam(request(fields), limits).map((v) => v.field);
}

describe('validateTakeExam', () => {
  it('accepts a request with nothing set: the daemon defaults apply', () => {
    expect(validateTakeExam(request({}), limits)).toEqual([]);
  });

  it('accepts a fully set, valid request', () => {
    const valid = request({
      modelName: 'distilgpt2',
      adapterPath: 'results/checkpoint-250',
      prompt: 'Instruction: Which genre is the hobbit?\nResponse:',
      maxNewTokens: 64,
      device: 'cuda:1',
      quantization: { loadIn4bit: true, bnb4bitComputeDtype: 'torch.bfloat16' },
      expectedAnswer: '',
      disableAdapter: true,
    });
    expect(validateTakeExam(valid, limits)).toEqual([]);
  });

  it.each([
    [{ prompt: '   ' }, 'prompt'],
    [{ modelName: '' }, 'model_name'],
    [{ adapterPath: '\t' }, 'adapter_path'],
    [{ maxNewTokens: 0 }, 'max_new_tokens'],
    [{ maxNewTokens: 65 }, 'max_new_tokens'],
    [{ maxNewTokens: -3 }, 'max_new_tokens'],
    [{ device: 'tpu' }, 'device'],
    [{ device: 'cuda:' }, 'device'],
    [{ device: 'CPU' }, 'device'],
    [{ quantization: { bnb4bitComputeDtype: 'int8' } }, 'quantization.bnb_4bit_compute_dtype'],
  ] as [Partial<TakeExamRequest>, string][])('refuses %j naming %s', (fields, field) => {
    expect(fieldsOf(fields)).toEqual([field]);
  });

  it('names every bad field at once, with what was wrong', () => {
    const violations = validateTakeExam(request({ prompt: '', maxNewTokens: 1000, device: 'gpu' }), limits);
    expect(violations.map((v) => v.field)).toEqual(['prompt', 'max_new_tokens', 'device']);
    expect(violations[1].description).toBe('must be between 1 and 64, got 1000');
  });

  it.each(['auto', 'cpu', 'cuda', 'cuda:0', 'cuda:12', 'mps'])('accepts device %s', (device) => {
    expect(fieldsOf({ device })).toEqual([]);
  });

  it.each(COMPUTE_DTYPES)('accepts compute dtype %s', (dtype) => {
    expect(fieldsOf({ quantization: { bnb4bitComputeDtype: dtype } })).toEqual([]);
  });

  it('property: any request is either valid or has violations naming known fields, never a throw', () => {
    const known = new Set([
      'model_name',
      'adapter_path',
      'prompt',
      'max_new_tokens',
      'device',
      'quantization.bnb_4bit_compute_dtype',
    ]);
    const text = fc.option(fc.oneof(fc.string(), fc.constantFrom('', ' ', '\n')), { nil: undefined });
    const arbitraryRequest = fc.record({
      modelName: text,
      adapterPath: text,
      prompt: text,
      maxNewTokens: fc.option(fc.integer({ min: -(2 ** 31), max: 2 ** 31 - 1 }), { nil: undefined }),
      device: fc.option(fc.oneof(fc.string(), fc.constantFrom('auto', 'cpu', 'cuda:3', 'mps')), { nil: undefined }),
      quantization: fc.option(
        fc.record({
          loadIn4bit: fc.option(fc.boolean(), { nil: undefined }),
          bnb4bitComputeDtype: fc.option(fc.oneof(fc.string(), fc.constantFrom(...COMPUTE_DTYPES)), { nil: undefined }),
        }),
        { nil: undefined },
      ),
      expectedAnswer: text,
      disableAdapter: fc.boolean(),
      stop: fc.constant<string[]>([]),
    });
    fc.assert(
      fc.property(arbitraryRequest, (req) => {
        const violations = validateTakeExam(req, limits);
        for (const v of violations) {
          expect(known.has(v.field)).toBe(true);
          expect(v.description.length).toBeGreaterThan(0);
        }
        const tokensOk = req.maxNewTokens === undefined || (req.maxNewTokens >= 1 && req.maxNewTokens <= 64);
        expect(violations.some((v) => v.field === 'max_new_tokens')).toBe(!tokensOk);
      }),
      { numRuns: 500 },
    );
  });

  it('checks the sampling fields with the sidecar limits', () => {
    expect(fieldsOf({ temperature: 0, topP: 1, topK: 0, repetitionPenalty: 10, seed: 7 })).toEqual([]);
    expect(fieldsOf({ temperature: 100.5 })).toEqual(['temperature']);
    expect(fieldsOf({ temperature: -0.1 })).toEqual(['temperature']);
    expect(fieldsOf({ topP: 0 })).toEqual(['top_p']);
    expect(fieldsOf({ topP: Number.NaN })).toEqual(['top_p']);
    expect(fieldsOf({ topK: -1 })).toEqual(['top_k']);
    expect(fieldsOf({ repetitionPenalty: 0 })).toEqual(['repetition_penalty']);
    expect(fieldsOf({ repetitionPenalty: 10.5 })).toEqual(['repetition_penalty']);
  });

  it('checks stop sequences: at most 8, each 1..128 characters', () => {
    expect(fieldsOf({ stop: Array.from({ length: 8 }, () => 'x'.repeat(128)) })).toEqual([]);
    expect(fieldsOf({ stop: Array.from({ length: 9 }, () => 'x') })).toEqual(['stop']);
    expect(fieldsOf({ stop: [''] })).toEqual(['stop']);
    expect(fieldsOf({ stop: ['x'.repeat(129)] })).toEqual(['stop']);
    // Characters, not UTF-16 units: 128 emoji fit.
    expect(fieldsOf({ stop: ['😀'.repeat(128)] })).toEqual([]);
  });

  it('checks adapter_name: its pattern, and never with adapter_path or disable_adapter', () => {
    expect(fieldsOf({ adapterName: 'genre_b-2' })).toEqual([]);
    expect(fieldsOf({ adapterName: '2genre' })).toEqual(['adapter_name']);
    expect(fieldsOf({ adapterName: `a${'b'.repeat(64)}` })).toEqual(['adapter_name']);
    expect(fieldsOf({ adapterName: 'a', adapterPath: 'x' })).toEqual(['adapter_name']);
    const combined = validateTakeExam(request({ adapterName: 'a', disableAdapter: true }), limits);
    expect(combined).toEqual([{ field: 'adapter_name', description: 'cannot be combined with disable_adapter' }]);
  });
});
