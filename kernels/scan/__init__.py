"""Linear-recurrence scan: a chunked Pallas kernel, its XLA twin, and references."""

from lm.kernels.scan.chunked import linear_scan
from lm.kernels.scan.reference import scan_associative, scan_reference

__all__ = ["linear_scan", "scan_associative", "scan_reference"]
