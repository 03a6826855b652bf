"""Run dirs -> tables and plots: the report stage (pipeline.report.build.build.report)."""
