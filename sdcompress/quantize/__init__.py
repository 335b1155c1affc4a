"""Post-training quantization of whole checkpoints (`sdcompress quantize`).

fp8 and scaled-fp8 single files, GGUF U-Nets and diffusers-quantized folders,
with the layers kept at higher precision chosen by measurement. Optional
dependencies (`gguf`, bitsandbytes, torchao) are imported inside the modules
that need them, never here.
"""
