/** The x-golem-adapter value the CLI sends: what a mesh hashes on to keep an adapter on one replica. */
import { BASE_ROUTE, examRoute, firstAdapterRoute } from '../../src/cli/routing';

describe('examRoute', () => {
  const fallback = 'models/adapters/genres/checkpoint-final';

  it('is the registered name, else the bare base, else the path, else the default adapter', () => {
    expect(examRoute({ adapterName: 'genres', adapterPath: 'x' }, fallback)).toBe('genres');
    expect(examRoute({ disableAdapter: true, adapterPath: 'x' }, fallback)).toBe(BASE_ROUTE);
    expect(examRoute({ adapterPath: '/adapters/a' }, fallback)).toBe('/adapters/a');
    expect(examRoute({ prompt: 'Which genre is dune?' }, fallback)).toBe(fallback);
  });
});

describe('firstAdapterRoute', () => {
  it('follows the first adapter, or the base when there is none', () => {
    expect(firstAdapterRoute(['a', 'b'])).toBe('a');
    expect(firstAdapterRoute([])).toBe(BASE_ROUTE);
  });
});
