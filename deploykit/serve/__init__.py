"""Starting and stopping real inference servers (Triton, TorchServe) and waiting for them to be healthy."""
