"""What a model is and becomes: architectures, the networks, the artifact (weights +
card), export to TorchScript/ONNX.

Empty on purpose: importing a module of this stage imports nothing else
(``breakhis X --help`` stays torch-free)."""
