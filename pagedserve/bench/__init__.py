"""Benchmark harness: realistic workloads, runners (this engine, HF transformers, any OpenAI-compatible
server over HTTP), latency/throughput metrics, and a report with plots.

Every number it produces is a measurement of real generation; nothing here sleeps in place of compute.
"""
