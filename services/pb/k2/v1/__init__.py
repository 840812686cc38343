"""Generated from protos/k2/v1 (scripts/gen_protos.py); do not edit."""
