"""ImageNet on HPC clusters: verified prep, DDP training, exact eval and result tables.

Each stage is one module with a plain function as its door: ``prep.prepare``, ``train.train``,
``evaluate.evaluate`` and ``report.report``. What a stage leaves on disk is the only thing the next reads.
"""
