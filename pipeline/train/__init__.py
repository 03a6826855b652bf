"""Batches -> run dir: the train stage (pipeline.train.trainer.trainer.train), its loop, checkpoints, optimizer and
schedule, preemption, live metrics and hang diagnosis."""
