"""Run a merge CLI in this process and report its peak RSS (VmHWM) on stderr.

    python _peak_rss.py ARGS...              evomerge's mergekit-yaml
    python _peak_rss.py --mergekit ARGS...   mergekit's mergekit-yaml (run with mergekit's venv python)

VmHWM belongs to the address space created at exec, so, unlike a child's ru_maxrss, it does
not include the memory of the parent that forked it."""

import json
import sys


def _hwm_kib() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))


if sys.argv[1:2] == ["--mergekit"]:
    from mergekit.scripts.run_yaml import main as mergekit_main

    try:
        mergekit_main(sys.argv[2:], standalone_mode=False)
        rc = 0
    except SystemExit as e:
        rc = int(e.code or 0)
else:
    from merge_engine.cli import main

    sys.argv = ["mergekit-yaml", *sys.argv[1:]]
    rc = main()  # as the mergekit-yaml command calls it (argv from sys.argv)
print(json.dumps({"peak_rss_kib": _hwm_kib()}), file=sys.stderr)
sys.exit(rc)
