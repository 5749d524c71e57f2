"""Run mergekit-yaml in this process and report its peak RSS (VmHWM) on stderr.

VmHWM belongs to the address space created at exec, so, unlike a child's ru_maxrss, it does
not include the memory of the parent that forked it."""

import json
import sys

from merge_engine.cli import main

rc = main(sys.argv[1:])
hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_kib": hwm_kib}), file=sys.stderr)
sys.exit(rc)
