#!/usr/bin/env python3
"""Make N ranges on a running skv cluster by concurrent splits (binary subdivision).

usage: scripts/make-ranges.py N [PARALLEL]   (after pasting the playground's export line)

Used for the idle-ranges measurement (docs/bench/idle-ranges.md). Start the playground with
merges off so that the ranges stay, e.g.
  skvctl playground --placement-arg=--merge-size-bytes=0 --storenode-arg=--raft-hibernate=true
SKVCTL names the skvctl binary (default target/release/skvctl).
Split keys idle/00001 .. idle/N-1 (user keys in the default namespace). Each round splits
every range that still contains a missing split key at the middle missing key, in
parallel; a round's failures ("leader not known yet" right after a split) are retried in
the next round.
"""
import json, os, subprocess, sys, time, bisect
from concurrent.futures import ThreadPoolExecutor

SKVCTL = os.environ.get("SKVCTL", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "skvctl"))
n = int(sys.argv[1]); par = int(sys.argv[2]) if len(sys.argv) > 2 else 16
want = [f"idle/{i:05d}" for i in range(1, n)]

def ranges():
    out = subprocess.run([SKVCTL, "--output", "json", "ranges"], capture_output=True, text=True, timeout=60)
    d = json.loads(out.stdout)
    return d

def split(rid, key):
    r = subprocess.run([SKVCTL, "--output", "json", "split", str(rid), "--at", key], capture_output=True, text=True, timeout=60)
    return r.returncode == 0

def ukey(s):
    """A range bound as skvctl prints it -> the user key ('' for an infinite bound)."""
    if s in ("-inf", "+inf", ""):
        return ""
    if s.startswith("default:"):
        return s[len("default:"):]
    return "\x00"  # another namespace's bound: sorts before our keys

t0 = time.time()
rs = ranges()
for rnd in range(200):
    rs = ranges()
    # user-key boundaries: 'start_key'/'end_key' fields as skvctl prints them
    starts = set()
    for r in rs:
        starts.add(ukey(r.get("start", "")))
    missing = [k for k in want if k not in starts]
    print(f"t={time.time()-t0:6.1f}s round {rnd}: {len(rs)} ranges, {len(missing)} split keys missing", flush=True)
    if not missing:
        break
    # group missing keys by the range containing them; split each range at its middle missing key
    jobs = []
    for r in rs:
        s = ukey(r.get("start", "")); e = ukey(r.get("end", ""))
        lo = bisect.bisect_right(missing, s) if s else 0
        hi = bisect.bisect_left(missing, e) if e else len(missing)
        inside = [k for k in missing[lo:hi] if k > s]
        if inside:
            jobs.append((r.get("range_id") or r.get("id"), inside[len(inside)//2]))
    with ThreadPoolExecutor(par) as ex:
        ok = sum(ex.map(lambda j: split(*j), jobs))
    print(f"   {len(jobs)} splits tried, {ok} ok", flush=True)
    if ok == 0:
        time.sleep(1)
print(f"done: {len(ranges())} ranges in {time.time()-t0:.0f}s")
