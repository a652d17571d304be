"""Bridges to other quantization toolkits: a trained RS-Net as a brevitas model (for QONNX/FINN)."""
