/**
 * A second "host" for a remote sidecar: a network namespace joined to this one by a veth pair
 * (10.200.0.1 here, 10.200.0.2 there), so the sidecar is reached over a real network link that
 * a test can also cut. Needs root and iproute2; where either is missing, the fallback is a
 * separate process on TCP loopback, and `isolated` says which one this run got.
 */
import { execFileSync } from 'node:child_process';

export interface SidecarHost {
  /** True: a network namespace; false: the loopback fallback. */
  isolated: boolean;
  /** The sidecar host's address as the gateway dials it. */
  ip: string;
  /** A command (program and arguments) made to run on the sidecar host. */
  wrap(command: string[]): string[];
  /** Takes the link down (a cable pulled) or brings it back; namespace only. */
  setLink(up: boolean): void;
  /** Removes the namespace and its veth pair; safe to call more than once. */
  remove(): void;
}

const HOST_IP = '10.200.0.1';
const SIDECAR_IP = '10.200.0.2';

function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: 'ignore' });
}

/** Whether this machine lets us make (and remove) a network namespace. */
export function canUseNetns(): boolean {
  // Forces the fallback, to run it where namespaces would work.
  if (process.env.GOLEM_TEST_NO_NETNS === '1') return false;
  const probe = `golem-probe-${process.pid}`;
  try {
    ip('netns', 'add', probe);
    ip('netns', 'del', probe);
    return true;
  } catch {
    return false;
  }
}

/** Makes the namespace and its link, or the loopback fallback when `canUseNetns()` is false. */
export function sidecarHost(): SidecarHost {
  if (!canUseNetns()) {
    return {
      isolated: false,
      ip: '127.0.0.1',
      wrap: (command) => command,
      setLink: () => {
        throw new Error('no network namespace: there is no link to cut');
      },
      remove: () => undefined,
    };
  }
  const ns = `golem-remote-${process.pid}`;
  // Interface names are at most 15 characters.
  const outside = `gv${process.pid}`;
  const inside = `gs${process.pid}`;
  const remove = (): void => {
    for (const args of [
      ['netns', 'del', ns],
      ['link', 'del', outside],
    ]) {
      try {
        ip(...args);
      } catch {
        // Already gone: deleting the namespace takes the veth pair with it.
      }
    }
  };
  try {
    ip('netns', 'add', ns);
    ip('link', 'add', outside, 'type', 'veth', 'peer', 'name', inside);
    ip('link', 'set', inside, 'netns', ns);
    ip('addr', 'add', `${HOST_IP}/24`, 'dev', outside);
    ip('link', 'set', outside, 'up');
    ip('netns', 'exec', ns, 'ip', 'addr', 'add', `${SIDECAR_IP}/24`, 'dev', inside);
    ip('netns', 'exec', ns, 'ip', 'link', 'set', inside, 'up');
    ip('netns', 'exec', ns, 'ip', 'link', 'set', 'lo', 'up');
  } catch (err) {
    remove();
    throw err;
  }
  return {
    isolated: true,
    ip: SIDECAR_IP,
    wrap: (command) => ['ip', 'netns', 'exec', ns, ...command],
    setLink: (up) => ip('link', 'set', outside, up ? 'up' : 'down'),
    remove,
  };
}
