"""The run report: ``report.md`` and a self-contained ``report.html`` with PNG plots."""

from stkd_dist.report.render import write_report

__all__ = ["write_report"]
