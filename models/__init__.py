"""Backbones: the paper's checkpoint formats (compress, moco, torchvision, random) in `checkpoints`, the
model families loaded by name (torchvision weights, timm, OpenCLIP, Hugging Face, torch.hub) in `families`,
and VAAL's networks in `vaal`."""
