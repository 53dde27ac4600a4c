"""lorakit benchmarks: lorakit and PEFT on the same model and inputs, in one process, interleaved.

Run all: `make bench` (or `python -m benchmarks`); one: `python -m benchmarks --only train`.
"""
