"""Quantize: build quantized GGUF files inside a bundle with llama.cpp, recording how (docs/quantize.md).

Phases:

1. `build`: choose the source GGUF, check its bytes against the bundle, plan outputs and space
2. `llama`: llama.cpp's quantizer in a child process (the edge, llama-cpp-python)
3. `build`: hash each output, record its provenance, publish the new sovpack.json atomically
"""
