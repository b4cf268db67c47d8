"""Regenerate pipeline/scan/model/tfops.py: the TensorFlow ops the model scanner treats as compute.

Run with the project interpreter after a TensorFlow upgrade, then review the diff:

    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python tools/gen_modelscan_tfops.py

The list is every public `tf.raw_ops` name minus whole families that touch files, the network,
Python, devices or debugging (EXCLUDE) and minus the ops the scanner judges by name or attribute
(pipeline.scan.model TF_RULED_OPS). An op that is not on the list is reported as unknown (medium),
so a wrongly excluded op costs a false positive, never a miss.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path

# Families, not single ops: anything whose name says it reads/writes files, datasets or event
# logs, talks to other hosts or devices, runs Python, or streams tensors out for debugging.
EXCLUDE = re.compile(
    r"Dataset|Iterator|Reader|Summary|File|Debug|PyFunc|Save|Restore|Checkpoint|Immutable|Remap"
    r"|Vocab|Rpc|Remote|Collective|Nccl|^Send|^Recv|TPU|Tpu|Xla|Infeed|Outfeed|Enqueue|Dequeue"
    r"|Snapshot|^Abort$|^Copy$|CopyHost|DataService|Register"
    r"|Distributed|Matching|Record|Stats|Shutdown|Worker|Coordination|Barrier|Queue|^Stage"
    r"|Accumulator|Mutex|Sharded|Load"
)

HEADER = '''"""TensorFlow ops the model scanner treats as pure compute. GENERATED, do not edit.

Regenerate with tools/gen_modelscan_tfops.py (TensorFlow {version}, {count} ops) and review
the diff. Ops judged by name or attribute (file, Python, checkpoint, debug ops) are not here.
"""

from __future__ import annotations

_NAMES = """
'''


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from pipeline.scan.model.savedmodel import TF_RULED_OPS

    names = sorted(
        n
        for n in dir(tf.raw_ops)
        if not n.startswith("_") and not EXCLUDE.search(n) and n not in TF_RULED_OPS
    )
    body = textwrap.fill(" ".join(names), width=96, break_on_hyphens=False)
    tail = '\n"""\n\nCOMPUTE_OPS: frozenset[str] = frozenset(_NAMES.split())\n'
    out = HEADER.format(version=tf.__version__, count=len(names)) + body + tail
    dest = Path(__file__).resolve().parents[1] / "pipeline" / "scan" / "model" / "tfops.py"
    dest.write_text(out)
    print(f"wrote {dest} ({len(names)} ops)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
