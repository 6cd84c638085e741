"""Runners: each takes a Workload and returns a RunResult measured the same way.

- engine.py: this engine in-process, under a batching policy (continuous or static);
- hf.py: Hugging Face transformers `generate` in static, left-padded batches;
- openai_client.py: any OpenAI-compatible server over HTTP (streaming /v1/completions).
"""
