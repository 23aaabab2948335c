"""Bytes on disk: safetensors headers and bounded reads, output shards and writes, the resume state."""
