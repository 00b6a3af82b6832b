"""Diagnosis: the monitor, the held-out report and the plots (no effect on training)."""
