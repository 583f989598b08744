"""VAAL's networks (Sinha, Ebrahimi, Darrell, ICCV 2019): the authors' convolutional β-VAE, this project's
MLP VAE on feature vectors, and the discriminator on the latent mean. Training lives in lowbudget/vaal.py."""
from __future__ import annotations

import itertools

import torch
from torch import nn

HIDDEN = 512  # width of the discriminator's hidden layers (and of the feature VAE's)


def kaiming_init(module: nn.Module) -> None:
    """The authors' initialisation: Kaiming-normal weights and zero biases for the linear and convolution
    layers of their Sequential blocks (the μ / log σ² heads and transposed convolutions keep PyTorch's)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class Vae(nn.Module):
    """encoder -> (μ, log σ²) heads; decoder from a reparameterised sample."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, encoded: int, latent_dim: int):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        kaiming_init(self.encoder)
        kaiming_init(self.decoder)
        self.fc_mu = nn.Linear(encoded, latent_dim)
        self.fc_logvar = nn.Linear(encoded, latent_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of each row."""
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def forward(self, x: torch.Tensor, noise: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, μ, log σ²), the latent sample drawn with `noise`."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=noise, device=mu.device, dtype=mu.dtype)
        return self.decoder(mu + eps * (0.5 * logvar).exp()), mu, logvar


def _conv_block(conv: nn.Module, channels: int) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


def conv_vae(image_size: int, latent_dim: int, width: int = 128) -> Vae:
    """The authors' VAE: 4 stride-2 convolutions (3 -> w -> 2w -> 4w -> 8w, kernel 4, BN, ReLU), μ and
    log σ² heads on the flattened 8w x (s/16)² code; decoder linear z -> 8w x (s/8)², 3 transposed
    convolutions back to w channels, a 1x1 transposed convolution to 3. w = 128 is the authors'."""
    channels = [3, width, 2 * width, 4 * width, 8 * width]
    encoder: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(channels):
        encoder += _conv_block(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), c_out)
    encoded, start = 8 * width * (image_size // 16) ** 2, image_size // 8
    decoder: list[nn.Module] = [nn.Linear(latent_dim, 8 * width * start * start),
                                nn.Unflatten(1, (8 * width, start, start))]
    for c_in, c_out in zip(channels[:1:-1], channels[-2:0:-1], strict=True):
        decoder += _conv_block(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), c_out)
    decoder.append(nn.ConvTranspose2d(width, 3, 1))
    return Vae(nn.Sequential(*encoder, nn.Flatten()), nn.Sequential(*decoder), encoded, latent_dim)


def mlp_vae(dim: int, latent_dim: int) -> Vae:
    """This project's VAE on feature vectors: dim -> 512 -> 512 -> (μ, log σ²); z -> 512 -> 512 -> dim."""
    encoder = nn.Sequential(nn.Linear(dim, HIDDEN), nn.ReLU(inplace=True), nn.Linear(HIDDEN, HIDDEN),
                            nn.ReLU(inplace=True))
    decoder = nn.Sequential(nn.Linear(latent_dim, HIDDEN), nn.ReLU(inplace=True), nn.Linear(HIDDEN, HIDDEN),
                            nn.ReLU(inplace=True), nn.Linear(HIDDEN, dim))
    return Vae(encoder, decoder, HIDDEN, latent_dim)


def discriminator(latent_dim: int) -> nn.Sequential:
    """z -> 512 -> 512 -> 1 with ReLU; it outputs the logit (the authors' sigmoid is folded into the loss,
    and ranking by the logit is ranking by the sigmoid without its float32 saturation ties)."""
    net = nn.Sequential(nn.Linear(latent_dim, HIDDEN), nn.ReLU(inplace=True), nn.Linear(HIDDEN, HIDDEN),
                        nn.ReLU(inplace=True), nn.Linear(HIDDEN, 1), nn.Flatten(0))
    kaiming_init(net)
    return net
