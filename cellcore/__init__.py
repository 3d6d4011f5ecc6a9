"""The torch-free core that training, export, benchmarks and the phone app share: how a photo becomes model input."""
