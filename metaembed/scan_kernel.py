"""`metaembed.scan_kernel`, kept for code written before the kernel moved to `metaembed.retrieval.scan_kernel`,
and for `python -m metaembed.scan_kernel` (build the kernel ahead of time)."""

import sys

from metaembed.retrieval.scan_kernel import amx_query_parts, choose, compiled, features, main, top_k, work_bytes

__all__ = ["choose", "top_k", "work_bytes", "compiled", "features", "amx_query_parts"]

if __name__ == "__main__":
    sys.exit(main())
