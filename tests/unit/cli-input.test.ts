import { parseExamInput } from '../../src/cli/input';

function violations(text: string): string[] {
  const parsed = parseExamInput(text);
  if (parsed.ok) throw new Error(`expected ${text} to be refused`);
  return parsed.violations.map((v) => `${v.field}: ${v.description}`);
}

describe('parseExamInput', () => {
  it('maps the seed keys onto the request', () => {
    const parsed = parseExamInput(
      JSON.stringify({
        modelName: 'distilgpt2',
        adapterPath: '../Quest_2/results/checkpoint-250',
        prompt: 'Instruction: Which genre is the hobbit?\nResponse:',
        maxNewTokens: 20,
        device: 'auto',
        quantization: { loadIn4Bit: true, bnb4BitComputeDtype: 'float16' },
        expectedAnswer: 'Fantasy',
        disableAdapter: true,
      }),
    );
    expect(parsed).toEqual({
      ok: true,
      request: {
        modelName: 'distilgpt2',
        adapterPath: '../Quest_2/results/checkpoint-250',
        prompt: 'Instruction: Which genre is the hobbit?\nResponse:',
        maxNewTokens: 20,
        device: 'auto',
        quantization: { loadIn4bit: true, bnb4bitComputeDtype: 'float16' },
        expectedAnswer: 'Fantasy',
        disableAdapter: true,
        stop: [],
      },
    });
  });

  it('leaves keys that were left out unset, so the daemon defaults apply', () => {
    const parsed = parseExamInput('{"prompt": "hi"}');
    expect(parsed.ok && parsed.request).toEqual({
      modelName: undefined,
      adapterPath: undefined,
      prompt: 'hi',
      maxNewTokens: undefined,
      device: undefined,
      quantization: undefined,
      expectedAnswer: undefined,
      disableAdapter: false,
      temperature: undefined,
      topP: undefined,
      topK: undefined,
      seed: undefined,
      stop: [],
      repetitionPenalty: undefined,
      adapterName: undefined,
    });
  });

  it('refuses malformed JSON', () => {
    expect(violations('{"prompt": ')).toEqual([expect.stringMatching(/^input: not valid JSON/)]);
  });

  it.each([
    ['[]', /an array/],
    ['"text"', /got string/],
    ['null', /got object/],
    ['3', /got number/],
  ])('refuses the non-object %s', (text, pattern) => {
    expect(violations(text)).toEqual([expect.stringMatching(pattern)]);
  });

  it('maps the sampling keys onto the request', () => {
    const text = '{"temperature": 0.7, "topP": 0.9, "topK": 5, "seed": 42, "stop": ["\\n"], "repetitionPenalty": 1.2, "adapterName": "genres"}';
    expect(parseExamInput(text)).toMatchObject({
      ok: true,
      request: { temperature: 0.7, topP: 0.9, topK: 5, seed: 42, stop: ['\n'], repetitionPenalty: 1.2, adapterName: 'genres' },
    });
    expect(violations('{"stop": "x"}')).toEqual([expect.stringMatching(/^stop: /)]);
    expect(violations('{"seed": -1}')).toEqual([expect.stringMatching(/^seed: /)]);
  });

  it('names unknown keys, nested ones with their path', () => {
    expect(violations('{"modelname": "x", "quantization": {"loadIn4bit": true}, "beams": 1}').sort()).toEqual([
      'beams: unknown key',
      'modelname: unknown key (did you mean modelName?)',
      'quantization.loadIn4bit: unknown key (did you mean loadIn4Bit?)',
    ]);
  });

  it.each([
    ['{"maxNewTokens": "20"}', 'maxNewTokens'],
    ['{"maxNewTokens": 2.5}', 'maxNewTokens'],
    ['{"maxNewTokens": 1e12}', 'maxNewTokens'],
    ['{"prompt": 7}', 'prompt'],
    ['{"disableAdapter": "yes"}', 'disableAdapter'],
    ['{"quantization": true}', 'quantization'],
    ['{"quantization": {"loadIn4Bit": "true"}}', 'quantization.loadIn4Bit'],
    ['{"adapterPath": null}', 'adapterPath'],
  ])('refuses the wrong type in %s naming %s', (text, key) => {
    expect(violations(text)).toEqual([expect.stringMatching(new RegExp(`^${key.replace('.', '\\.')}: `))]);
  });
});
