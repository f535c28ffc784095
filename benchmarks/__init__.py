"""segserve's benchmark suite: ``python -m benchmarks [--quick]`` measures and writes benchmarks/RESULTS.md.

Every comparison runs its contenders side by side in one process run, alternating, several repetitions, and
reports medians; ratios are the headline. Nothing here is a test and no test asserts a time.
"""
