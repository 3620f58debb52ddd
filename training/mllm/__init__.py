"""MLLM side of training: instruction data for referring and grounding (``cloc-mllm-data``)."""
