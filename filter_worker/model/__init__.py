"""The model: loading and lock files, the engines (torch, ONNX Runtime), export, scores and labels."""
