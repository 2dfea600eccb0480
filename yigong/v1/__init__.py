"""Generated from proto/yigong/v1 by scripts/gen_protos.py. Do not edit."""
