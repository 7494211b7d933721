"""``python -m jaxcnn.bench --scaling-worker CONFIG``: the scaling section's child process (internal)."""

import sys

from jaxcnn.bench.sections import scaling_worker

if sys.argv[1:2] != ["--scaling-worker"] or len(sys.argv) != 3:
    sys.exit("python -m jaxcnn.bench is internal; run `jaxcnn bench --help`")
sys.exit(scaling_worker(sys.argv[2]))
