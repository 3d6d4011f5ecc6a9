"""Export half of the pipeline: phone formats, the manifest contract, and verification against PyTorch."""
