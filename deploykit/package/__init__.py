"""Writers of deployable artifacts: Triton model repositories, TorchServe archives, Kubernetes manifests."""
