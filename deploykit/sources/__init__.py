"""Where a pipeline's model, metric and loss come from: the zoo, the user's own code, or an ONNX file."""
