"""Archives -> data dir: download (pipeline.prep.prepare.download.fetch) and verified prep (pipeline.prep.prepare.prepare.prepare)
of ILSVRC2012 and CIFAR-10, with the synthetic archives tests and the demo use."""
