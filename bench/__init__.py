"""Latency harness: the gateway measured side by side with the raw runtime, interleaved."""
