"""Run dir -> exact top-1/top-5 counts: the eval stage (pipeline.eval.evaluate.evaluate)."""
