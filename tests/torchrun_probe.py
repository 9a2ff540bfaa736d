"""cifar.py's command line, recording for the tests which process wrote which file and each process's pid.

    torchrun --nproc-per-node 2 tests/torchrun_probe.py <cifar.py arguments>   (with PROBE_DIR set)

Every output of the pipeline goes through utils.atomic_write, so recording it shows every file a rank wrote.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cifar  # noqa: E402
import utils  # noqa: E402

probe = Path(os.environ["PROBE_DIR"])
rank = os.environ.get("RANK", "0")
(probe / f"rank{rank}.pid").write_text(str(os.getpid()))
atomic_write = utils.atomic_write


def recorded(path, write):
    with open(probe / f"rank{rank}.writes", "a") as f:
        f.write(f"{path}\n")
    return atomic_write(path, write)


utils.atomic_write = recorded

sys.exit(cifar.cli())
