"""attnseg.engines: compiled engines (torch.compile, ONNX Runtime, TensorRT) whose UNet also
outputs the class-token attention maps, the AOT-compiled kernel library, and a torch-free
deploy runtime. See ARCHITECTURE.md, "Engines"."""
