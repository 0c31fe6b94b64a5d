#!/usr/bin/env python3
"""One run of the filesystem benchmark phases in a directory; prints one JSON line.

Phases: sequential write of SRC (1 MiB blocks, fsync at the end), sequential read cold (page
cache dropped) and warm, then create N 4 KiB files, stat them all, delete them all.
"""
import json, os, sys, time

def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: "cold" is then only as cold as the machine allows

def main():
    d, src, nfiles = sys.argv[1], sys.argv[2], int(sys.argv[3])
    block = 1 << 20
    out = {}
    size = os.path.getsize(src)
    target = os.path.join(d, "big.bin")
    with open(src, "rb") as s:  # warm the source so only the destination is measured
        while s.read(block):
            pass
    t = time.perf_counter()
    with open(src, "rb") as s, open(target, "wb") as o:
        while True:
            b = s.read(block)
            if not b:
                break
            o.write(b)
        o.flush()
        os.fsync(o.fileno())
    out["write_s"] = time.perf_counter() - t
    drop_caches()
    for phase in ("read_cold_s", "read_warm_s"):
        t = time.perf_counter()
        with open(target, "rb", buffering=0) as f:
            while f.read(block):
                pass
        out[phase] = time.perf_counter() - t
    os.unlink(target)
    small = os.path.join(d, "small")
    os.mkdir(small)
    payload = os.urandom(4096)
    names = [os.path.join(small, f"f{i:05d}") for i in range(nfiles)]
    t = time.perf_counter()
    for i, n in enumerate(names):
        with open(n, "wb") as f:
            f.write(payload[:4088] + i.to_bytes(8, "little"))
    out["create_s"] = time.perf_counter() - t
    drop_caches()
    t = time.perf_counter()
    for n in names:
        os.stat(n)
    out["stat_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for n in names:
        os.unlink(n)
    out["delete_s"] = time.perf_counter() - t
    os.rmdir(small)
    out["size_mib"] = size >> 20
    print(json.dumps(out))

main()
