"""What a batch job runs: thin module-level entry points around the stages in ``pipeline``.

Each stage module has ``main(argv)`` for ``python -m jobs.<stage>`` (and for torchrun), and the
launcher pickles their submitit callables. Heavy imports happen inside the calls.
"""
