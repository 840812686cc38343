"""Generated from protos/k2 (scripts/gen_protos.py); do not edit."""
