"""Read-only analysis of sgdnoise studies: MLflow runs -> tables, regimes, figures, report.

This package never imports the training code; it reads only what the training side
wrote to MLflow (see `analysis.query` for the contract it relies on).
"""

from analysis.query import StudyRuns, load_study
from analysis.report import analyze
from analysis.reportmd import write_report

__all__ = ["StudyRuns", "analyze", "load_study", "write_report"]
