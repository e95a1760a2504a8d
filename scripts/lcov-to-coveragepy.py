#!/usr/bin/env python3
"""The ingest benchmark's bridge to coverage.py (examples/bench_ingest).

  lcov-to-coveragepy.py convert SHARD.info OUT.coverage
      writes the lines an LCOV shard executed (DA with a count > 0) as a coverage.py data
      file, so `coverage combine` can merge the same data covd merges. coverage.py stores
      executed lines only (no counts, no executable lines: those come from the sources).
  lcov-to-coveragepy.py dump DATA.coverage OUT.json
      writes {path: [executed lines]} of a (combined) data file, for the equality check.
"""
import json
import sys

from coverage import CoverageData


def convert(shard, out):
    lines = {}
    current = None
    with open(shard, "rb") as f:
        for raw in f:
            if raw.startswith(b"SF:"):
                current = raw[3:].strip().decode()
                lines.setdefault(current, set())
            elif raw.startswith(b"DA:"):
                number, count = raw[3:].split(b",")[:2]
                if int(count) > 0:
                    lines[current].add(int(number))
    data = CoverageData(basename=out)
    data.add_lines({path: sorted(ls) for path, ls in lines.items() if ls})
    data.write()


def dump(datafile, out):
    data = CoverageData(basename=datafile)
    data.read()
    with open(out, "w") as f:
        json.dump({p: sorted(data.lines(p) or []) for p in data.measured_files()}, f)


if __name__ == "__main__":
    verb, source, target = sys.argv[1:4]
    {"convert": convert, "dump": dump}[verb](source, target)
