"""Loaded at start-up by every Python process whose PYTHONPATH starts here (test_collectives.py): records the
dtype of every tensor that enters a torch.distributed collective, one line per call, in $DTYPE_PROBE_DIR."""
import functools
import os

if os.environ.get("DTYPE_PROBE_DIR"):
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
                   "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter")

    def _tensors(value):
        if hasattr(value, "dtype"):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from _tensors(item)

    def _probe(name, collective):
        @functools.wraps(collective)
        def wrapper(*args, **kwargs):
            dtypes = {str(t.dtype) for value in (*args, *kwargs.values()) for t in _tensors(value)}
            path = os.path.join(os.environ["DTYPE_PROBE_DIR"], f"{os.getpid()}.txt")
            with open(path, "a") as fh:
                fh.write(f"{name} {' '.join(sorted(dtypes))}\n")
            return collective(*args, **kwargs)
        return wrapper

    for _name in COLLECTIVES:
        if hasattr(c10d, _name):
            _wrapped = _probe(_name, getattr(c10d, _name))
            setattr(c10d, _name, _wrapped)  # calls inside torch.distributed (all_gather_object, ...) see it too
            setattr(dist, _name, _wrapped)
