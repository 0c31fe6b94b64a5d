#!/usr/bin/env python3
"""One run of the filesystem benchmark phases in a directory; prints one JSON line.

Phases: sequential write of SRC (1 MiB blocks, fsync at the end), sequential read cold (page
cache dropped) and warm, then create N 4 KiB files, stat them all, delete them all; with an
ARCHIVE (a tar of /usr/include, hard links kept), untar it, `ls -lR` the tree (caches dropped
first) and `rm -r` it. With a daemon PID, the CPU seconds that process spent in each phase are
reported too (`cpu_<phase>`): the steadiest figure on a shared machine.

Usage: fs_phases.py DIR SRC NFILES [ARCHIVE|-] [PID]
"""
import json, os, subprocess, sys, time

def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: "cold" is then only as cold as the machine allows

def cpu_seconds(pid):
    """utime + stime of PID (and its reaped children), in seconds; 0 without a PID."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")

class Phase:
    """Times one phase (wall and the daemon's CPU) into `out` under `name`."""
    def __init__(self, out, name, pid):
        self.out, self.name, self.pid = out, name, pid
    def __enter__(self):
        self.cpu = cpu_seconds(self.pid)
        self.t = time.perf_counter()
    def __exit__(self, *exc):
        self.out[self.name] = time.perf_counter() - self.t
        if self.pid:
            self.out["cpu_" + self.name] = cpu_seconds(self.pid) - self.cpu

def main():
    d, src, nfiles = sys.argv[1], sys.argv[2], int(sys.argv[3])
    archive = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    pid = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    block = 1 << 20
    out = {}
    size = os.path.getsize(src)
    target = os.path.join(d, "big.bin")
    with open(src, "rb") as s:  # warm the source so only the destination is measured
        while s.read(block):
            pass
    with Phase(out, "write_s", pid), open(src, "rb") as s, open(target, "wb") as o:
        while True:
            b = s.read(block)
            if not b:
                break
            o.write(b)
        o.flush()
        os.fsync(o.fileno())
    drop_caches()
    for phase in ("read_cold_s", "read_warm_s"):
        with Phase(out, phase, pid), open(target, "rb", buffering=0) as f:
            while f.read(block):
                pass
    os.unlink(target)
    small = os.path.join(d, "small")
    os.mkdir(small)
    payload = os.urandom(4096)
    names = [os.path.join(small, f"f{i:05d}") for i in range(nfiles)]
    with Phase(out, "create_s", pid):
        for i, n in enumerate(names):
            with open(n, "wb") as f:
                f.write(payload[:4088] + i.to_bytes(8, "little"))
    drop_caches()
    with Phase(out, "stat_s", pid):
        for n in names:
            os.stat(n)
    with Phase(out, "delete_s", pid):
        for n in names:
            os.unlink(n)
    os.rmdir(small)
    if archive:
        tree = os.path.join(d, "untar")
        os.mkdir(tree)
        with Phase(out, "untar_s", pid):
            subprocess.run(["tar", "-xf", archive, "-C", tree], check=True)
        drop_caches()
        with Phase(out, "ls_lR_s", pid):
            subprocess.run(["ls", "-lR", tree], check=True, stdout=subprocess.DEVNULL)
        with Phase(out, "rm_r_s", pid):
            subprocess.run(["rm", "-r", tree], check=True)
    out["size_mib"] = size >> 20
    print(json.dumps(out))

main()
