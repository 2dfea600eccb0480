"""Wire contract package. ``yigong.v1`` holds code generated from ``proto/yigong/v1``."""
