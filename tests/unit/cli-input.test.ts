import { fromBinary } from '@bufbuild/protobuf';
import { parseCompareInput, parseExamInput } from '../../src/cli/input';
import { messageDescriptor } from '../../src/contract';
import { TakeExamRequest } from '../../src/gen/golem/exam/v1/exam';

function violations(text: string, parse = parseExamInput): string[] {
  const parsed = parse(text);
  if (parsed.ok) throw new Error(`expected ${text} to be refused`);
  return parsed.violations.map((v) => `${v.field}: ${v.description}`);
}

function request(text: string, parse = parseExamInput): Record<string, unknown> {
  const parsed = parse(text);
  if (!parsed.ok) throw new Error(`expected ${text} to parse: ${JSON.stringify(parsed.violations)}`);
  return parsed.request;
}

describe('parseExamInput', () => {
  it("maps the seed script's keys onto the request, quantization spelled as the seed spells it", () => {
    const input = {
      modelName: 'distilgpt2',
      adapterPath: '../Quest_2/results/checkpoint-250',
      prompt: 'Instruction: Which genre is the hobbit?\nResponse:',
      maxNewTokens: 20,
      device: 'auto',
      quantization: { loadIn4Bit: true, bnb4BitComputeDtype: 'float16' },
      expectedAnswer: 'Fantasy',
      disableAdapter: true,
    };
    const parsed = parseExamInput(JSON.stringify(input));
    expect(parsed.ok && parsed.request).toEqual(input);
    // The bytes are the request itself, as the generated code reads it.
    expect(parsed.ok && TakeExamRequest.decode(parsed.bytes)).toEqual({
      ...input,
      // effective_compute_dtype is output only (a plain proto3 string): "" in a request.
      quantization: { loadIn4bit: true, bnb4bitComputeDtype: 'float16', effectiveComputeDtype: '' },
      stop: [],
    });
  });

  it('leaves keys that were left out unset, so the daemon defaults apply', () => {
    const parsed = parseExamInput('{"prompt": "hi"}');
    expect(parsed.ok && parsed.request).toEqual({ prompt: 'hi' });
    expect(parsed.ok && TakeExamRequest.decode(parsed.bytes)).toEqual({
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

  it('takes proto3 JSON as proto3 JSON: proto field names, numbers as strings, null as unset', () => {
    expect(request('{"max_new_tokens": 3, "quantization": {"load_in_4bit": true}}')).toEqual({
      maxNewTokens: 3,
      quantization: { loadIn4Bit: true },
    });
    expect(request('{"maxNewTokens": "5"}')).toEqual({ maxNewTokens: 5 });
    expect(request('{"adapterPath": null}')).toEqual({});
  });

  it.each([
    ['18446744073709551615', '18446744073709551615'],
    ['"18446744073709551615"', '18446744073709551615'],
    ['9007199254740993', '9007199254740993'],
    ['42', '42'],
  ])('keeps the uint64 seed %s exact, as a JSON number or string', (seed, exact) => {
    const parsed = parseExamInput(`{"seed": ${seed}, "temperature": 0.7}`);
    expect(parsed.ok && parsed.request.seed).toBe(exact);
    const desc = messageDescriptor('golem.exam.v1.TakeExamRequest');
    const decoded = parsed.ok ? (fromBinary(desc, parsed.bytes) as unknown as { seed?: bigint }) : undefined;
    expect(decoded?.seed).toBe(BigInt(exact));
  });

  it('refuses a seed beyond uint64, and big integers in fields that are not 64-bit', () => {
    expect(violations('{"seed": 18446744073709551616}')).toEqual([expect.stringMatching(/^seed: .*out of range/)]);
    expect(violations('{"seed": -1}')).toEqual([expect.stringMatching(/^seed: /)]);
    expect(violations('{"maxNewTokens": 9007199254740993}')).toEqual([
      expect.stringMatching(/^maxNewTokens: .*out of range/),
    ]);
    expect(violations('{"prompt": 9007199254740993}')).toEqual([expect.stringMatching(/^prompt: expected string/)]);
  });

  it('refuses malformed JSON', () => {
    expect(violations('{"prompt": ')).toEqual([expect.stringMatching(/^input: not valid JSON/)]);
  });

  it.each([
    ['[]', /an array/],
    ['"text"', /got string/],
    ['null', /got object/],
    ['3', /got number/],
    ['18446744073709551615', /got number/],
  ])('refuses the non-object %s', (text, pattern) => {
    expect(violations(text)).toEqual([expect.stringMatching(pattern)]);
  });

  it('maps the sampling keys onto the request', () => {
    const text =
      '{"temperature": 0.5, "topP": 0.75, "topK": 5, "seed": 42, "stop": ["\\n"], "repetitionPenalty": 1.5, "adapterName": "genres"}';
    expect(request(text)).toEqual({
      temperature: 0.5,
      topP: 0.75,
      topK: 5,
      seed: '42',
      stop: ['\n'],
      repetitionPenalty: 1.5,
      adapterName: 'genres',
    });
    expect(violations('{"stop": "x"}')).toEqual([expect.stringMatching(/^stop: /)]);
  });

  it('names unknown keys, nested ones with their path, and the key meant on a case slip', () => {
    expect(violations('{"modelname": "x", "quantization": {"loadIn4bit": true}, "beams": 1}').sort()).toEqual([
      'beams: unknown key',
      'modelname: unknown key (did you mean modelName?)',
      'quantization.loadIn4bit: unknown key (did you mean loadIn4Bit?)',
    ]);
  });

  it.each([
    ['{"maxNewTokens": "twenty"}', 'maxNewTokens'],
    ['{"maxNewTokens": 2.5}', 'maxNewTokens'],
    ['{"maxNewTokens": 1e12}', 'maxNewTokens'],
    ['{"maxNewTokens": true}', 'maxNewTokens'],
    ['{"prompt": 7}', 'prompt'],
    ['{"disableAdapter": "yes"}', 'disableAdapter'],
    ['{"quantization": true}', 'quantization'],
    ['{"quantization": {"loadIn4Bit": "true"}}', 'quantization.loadIn4Bit'],
    ['{"stop": [1]}', 'stop'],
  ])('refuses the wrong type in %s naming %s', (text, key) => {
    expect(violations(text)).toEqual([expect.stringMatching(new RegExp(`^${key.replace('.', '\\.')}: `))]);
  });

  it('names every bad key at once', () => {
    expect(
      violations('{"prompt": 1, "maxNewTokens": "x", "nope": 0}')
        .map((v) => v.split(':')[0])
        .sort(),
    ).toEqual(['maxNewTokens', 'nope', 'prompt']);
  });
});

describe('parseCompareInput', () => {
  it("takes CompareAdaptersRequest's proto3 JSON", () => {
    expect(
      request('{"prompts": ["a", "b"], "adapters": ["x"], "modelName": "m", "maxNewTokens": 3}', parseCompareInput),
    ).toEqual({
      prompts: ['a', 'b'],
      adapters: ['x'],
      modelName: 'm',
      maxNewTokens: 3,
    });
  });

  it('refuses keys CompareAdaptersRequest does not have, such as the old prompt shorthand', () => {
    expect(violations('{"prompt": "a", "adapters": ["x"]}', parseCompareInput)).toEqual(['prompt: unknown key']);
    expect(violations('{"prompts": "a", "adapters": ["x"]}', parseCompareInput)).toEqual([
      expect.stringMatching(/^prompts: /),
    ]);
  });
});
