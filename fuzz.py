#!/usr/bin/env python3
"""Throw generated and mutated inputs at the decoders; print what came out.

    python fuzz.py [COUNT]        (default 1,000,000)

Each input goes through the bencode decoder, the bugout packet opener
(``BugoutCore.receive_payload``) and the BitTorrent wire parser (``PeerWire``,
fed in two random cuts). Anything but the documented error is a failure and
is printed with the input that caused it. Peak memory is printed too.
"""

from __future__ import annotations

import argparse
import collections
import random
import resource
import sys
import time

import worker as w
from support import IDENT, VECTORS, fuzz_inputs, identity, mutations


def main(count: int = 1_000_000) -> int:
    core = w.BugoutCore(IDENT, identity("master"), seen_limit=10_000)
    infohash, info = w.infohash_of(IDENT)
    good_wire = (w.handshake_bytes(infohash, b"-WW0109-AAAAAAAAAAAA", dht=True)
                 + bytes.fromhex(VECTORS["keys"]["worker"]["full_extended_handshake_message_hex"])
                 + bytes.fromhex(VECTORS["rpc_isMaster"]["framed_message_hex"]))
    rng = random.Random(7)
    outcomes: collections.Counter = collections.Counter()
    failures = 0
    started = time.perf_counter()
    wire_inputs = mutations([good_wire], count, rng)
    for i, data in enumerate(fuzz_inputs(count, seed=2024)):
        try:
            w.bdecode(data)
            outcomes["bencode ok"] += 1
        except w.DecodeError:
            outcomes["bencode DecodeError"] += 1
        except Exception as exc:  # noqa: BLE001 - this is what a fuzzer looks for
            failures += 1
            print("bdecode raised %r on %r" % (exc, data[:200]))
        try:
            core.receive_payload(data, w._now())
            core.data_to_send()  # relays would go to the other wires
            wire = w.PeerWire(infohash, b"-QP0100-fuzzfuzzfuzz", {"m": {}}, initiator=False,
                              metadata=info, max_message=1 << 16)
            raw = next(wire_inputs)
            cut = rng.randrange(len(raw) + 1)
            wire.receive_data(raw[:cut])
            wire.receive_data(raw[cut:])
            outcomes["wire " + wire.state.name] += 1
        except Exception as exc:  # noqa: BLE001
            failures += 1
            print("packet/wire raised %r" % (exc,))
        if i and i % 100_000 == 0:
            print("  %d inputs, %.0f/s" % (i, i / (time.perf_counter() - started)), flush=True)
    elapsed = time.perf_counter() - started
    print("inputs: %d x 3 parsers in %.1f s (%.0f inputs/s)" % (count, elapsed, count / elapsed))
    for key, value in sorted(outcomes.items()):
        print("  %-22s %d" % (key, value))
    print("  packets dropped      %d (duplicates %d)" % (core.stats["dropped"], core.stats["duplicate"]))
    print("peak RSS: %.1f MB; unexpected exceptions: %d" % (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, failures))
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", nargs="?", type=int, default=1_000_000, help="inputs (default 1,000,000)")
    sys.exit(main(parser.parse_args().count))
