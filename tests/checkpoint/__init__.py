"""Tests of checkpoint files: shards, block-fp8 and the quantiser."""
