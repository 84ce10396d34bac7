"""The audit's room: its rows, limits and alerts over a study (`rows`), SpRAy clusters (`clusters`) and the
HTML atlas (`report`)."""
from . import clusters, report, rows

__all__ = ["clusters", "report", "rows"]
